//go:build linux

package chaos

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"text/tabwriter"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/status"
	"github.com/imagepipe/imagepipe/test/stack"
)

// size is how big a run is. The defaults are the reduced run CI does in
// about a minute; `go tool task chaos` sets the full size through:
//
//	CHAOS_IMAGES        convertible images of mixed formats (default 8)
//	CHAOS_ROUNDS        rounds of faults, each with its own wave of uploads (1)
//	CHAOS_SLACK_OUTAGE  how long the Slack webhook answers 500 (4s)
//	CHAOS_SETTLE        how long after the last fault every result must be in (90s)
//	CHAOS_SEED          seed for sizes, contents and timing (random; logged)
//	CHAOS_DIR           keep data and logs in a new directory under this one
type size struct {
	Images      int
	Rounds      int
	SlackOutage time.Duration
	Settle      time.Duration
	Seed        uint64
}

func sizeFromEnv(t *testing.T) size {
	t.Helper()
	z := size{Images: 8, Rounds: 1, SlackOutage: 4 * time.Second, Settle: 90 * time.Second, Seed: rand.Uint64()}
	for name, p := range map[string]any{
		"CHAOS_IMAGES": &z.Images, "CHAOS_ROUNDS": &z.Rounds, "CHAOS_SLACK_OUTAGE": &z.SlackOutage,
		"CHAOS_SETTLE": &z.Settle, "CHAOS_SEED": &z.Seed,
	} {
		v := os.Getenv(name)
		if v == "" {
			continue
		}
		var err error
		switch p := p.(type) {
		case *int:
			*p, err = strconv.Atoi(v)
		case *uint64:
			*p, err = strconv.ParseUint(v, 10, 64)
		case *time.Duration:
			*p, err = time.ParseDuration(v)
		}
		if err != nil {
			t.Fatalf("%s=%q: %v", name, v, err)
		}
	}
	z.Rounds = max(z.Rounds, 1)
	return z
}

// Settings of the stack under test: short waits so that faults heal within
// the run, and enough attempts that a job hit by every fault still has one
// left (see maxKillsPerJob).
var stackEnv = map[string]string{
	"IMAGEPIPE_MAX_CONCURRENT_JOBS": "2",
	"IMAGEPIPE_MAX_ATTEMPTS":        "6",
	"IMAGEPIPE_RETRY_BACKOFF":       "250ms",
	"IMAGEPIPE_ACK_WAIT":            "4s",
	"IMAGEPIPE_NOTIFY_ON":           "success,failure",
}

// bigVirtual makes an output larger than objstore's 128 MiB part, so that
// it goes up as a multipart upload, which a crash can leave half done.
const bigVirtual = 192 << 20

// Indexes of the faults in each round that need particular images.
const (
	uploadKillStep = 2
	scratchStep    = 4
)

func TestFaultsLoseDuplicateAndCorruptNothing(t *testing.T) {
	if err := stack.CheckTools(); err != nil {
		t.Fatal(err)
	}
	z := sizeFromEnv(t)
	t.Logf("size: %d images, %d round(s), Slack down %s, seed %d (CHAOS_SEED)", z.Images, z.Rounds, z.SlackOutage, z.Seed)
	rng := rand.New(rand.NewPCG(z.Seed, z.Seed^0x5eed))
	ctx, cancel := context.WithTimeout(context.Background(), stack.Scaled(60*time.Minute))
	defer cancel()
	var err error

	dir := t.TempDir()
	if keep := os.Getenv("CHAOS_DIR"); keep != "" {
		// Kept after the run, for reading the logs.
		dir, err = os.MkdirTemp(keep, "chaos-")
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("data and logs in %s", dir)
	}
	bin, err := stack.Build(ctx, dir)
	if err != nil {
		t.Fatal(err)
	}
	scratchFS, mounted := mountScratch(t, filepath.Join(dir, "scratchfs"))
	scratch := filepath.Join(scratchFS, "scratch")
	if err := os.MkdirAll(scratch, 0o700); err != nil {
		t.Fatal(err)
	}

	imgs, byRound := makeImages(ctx, t, filepath.Join(dir, "images"), z, rng, scratchFS)

	slack := newFlakySlack()
	defer slack.srv.Close()
	env := map[string]string{"IMAGEPIPE_SLACK_WEBHOOK_URL": slack.URL()}
	for k, v := range stackEnv {
		env[k] = v
	}
	st, err := stack.Start(ctx, stack.Config{Dir: filepath.Join(dir, "stack"), Binary: bin, ScratchDir: scratch, Env: env, Compress: true, QueueEvents: true})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	defer func() {
		if t.Failed() {
			// What a job still running at the end is stuck on goes to
			// convert's log (kept with CHAOS_DIR).
			st.Procs["convert"].DumpStacks()
			t.Log(st.LogTail(6000))
		}
	}()
	if err := st.WaitConsumers(ctx); err != nil {
		t.Fatal(err)
	}
	results, sts := follow(ctx, t, st, "chaos-audit")
	defer results.Stop()
	in := &injector{st: st, states: sts, rng: rng, logf: t.Logf, hits: map[string]int{}}

	big := map[string]bool{}
	for _, img := range imgs {
		if img.VirtualSize >= bigVirtual {
			big[img.Key] = true
		}
	}
	started := time.Now()
	uploadErrs := make(chan error, len(imgs))
	upload := func(batch []stack.Image) {
		for _, img := range batch {
			if _, err := st.Upload(ctx, img); err != nil {
				uploadErrs <- err
			}
		}
	}
	in.slackOutage(ctx, slack, z.SlackOutage)
	for r := range z.Rounds {
		wave := byRound[r]
		// One upload waits for NATS to be down: MinIO must keep its
		// notification and deliver it later.
		late := wave[len(wave)-1]
		wave = wave[:len(wave)-1]
		steps := []func() error{
			0: func() error { return in.killConvert(ctx, events.StateDownloading, nil, 0) },
			func() error { return in.killConvert(ctx, events.StateConverting, nil, 0) },
			// Into the upload of a big output: its multipart upload exists
			// from the first moment.
			uploadKillStep: func() error {
				return in.killConvert(ctx, events.StateUploading, func(k string) bool { return big[k] }, 50*time.Millisecond)
			},
			func() error { return in.killConvert(ctx, events.StateReady, nil, 0) },
			scratchStep: func() error {
				if !mounted {
					in.record(fault{Name: "scratch filesystem full", Detail: "skipped: no tmpfs could be mounted (needs root or CAP_SYS_ADMIN)"})
					return nil
				}
				return in.fillScratch(ctx, scratchFS, 2*time.Second)
			},
			func() error {
				return in.restartNATS(1500*time.Millisecond, func() {
					if _, err := st.Upload(ctx, late); err != nil {
						uploadErrs <- fmt.Errorf("upload while NATS is down: %w", err)
					}
				})
			},
			func() error { return in.restartMinIO(ctx, time.Second) },
		}
		// Each fault gets its own share of the wave, uploaded just before
		// it, so that it always meets jobs in flight. The big images go
		// with the kill during upload, which needs one; those that must
		// fail go with the full scratch, which their retries outlast.
		var good, bad, bigs []stack.Image
		for _, img := range wave {
			switch {
			case img.Fail != nil:
				bad = append(bad, img)
			case big[img.Key]:
				bigs = append(bigs, img)
			default:
				good = append(good, img)
			}
		}
		for i, step := range steps {
			chunk := slices.Clone(good[i*len(good)/len(steps) : (i+1)*len(good)/len(steps)])
			switch i {
			case scratchStep:
				chunk = append(chunk, bad...)
			case uploadKillStep:
				chunk = append(chunk, bigs...)
			}
			upload(chunk)
			if err := step(); err != nil {
				t.Fatal(err)
			}
		}
	}
	close(uploadErrs)
	for err := range uploadErrs {
		t.Error(err)
	}
	faultsDone := time.Since(started)

	// Every image's final results, and every notification of them.
	want := 0
	for _, img := range imgs {
		want += max(len(img.Outputs), 1)
	}
	settle, cancelSettle := context.WithTimeout(ctx, z.Settle)
	defer cancelSettle()
	if err := results.Wait(settle, func(rs []stack.Result) bool { return countFinal(rs) >= want }); err != nil {
		t.Errorf("only %d of %d final results within %s of the last fault", countFinal(results.All()), want, z.Settle)
	}
	_ = waitFor(settle, func() bool { return notified(results.All(), slack.posts()) })
	// Give a late duplicate (result or post) the chance to show up, and
	// the convert replica time to clean up after its last job.
	time.Sleep(2 * time.Second)
	settled := time.Since(started)

	a := audit(ctx, t, st, imgs, results, slack, big)
	a.print(t, in.faults(), len(imgs), faultsDone, settled)
	a.check(t)
}

// mountScratch mounts a small tmpfs at dir for convert's scratch, so that
// scratch can really be filled. Without the privilege to mount, dir stays
// a plain directory and the fill fault is skipped.
func mountScratch(t *testing.T, dir string) (string, bool) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	const size = 320 << 20
	if err := syscall.Mount("tmpfs", dir, "tmpfs", syscall.MS_NOSUID|syscall.MS_NODEV, fmt.Sprintf("size=%d,mode=0700", size)); err != nil {
		t.Logf("scratch is a plain directory: mount tmpfs: %v", err)
		return dir, false
	}
	t.Cleanup(func() { _ = syscall.Unmount(dir, syscall.MNT_DETACH) })
	return dir, true
}

// makeImages builds each round's wave: convertible images of every kind,
// one with an output big enough for a multipart upload, and in the first
// round one refused by a safety rule and one too large for scratch.
func makeImages(ctx context.Context, t *testing.T, dir string, z size, rng *rand.Rand, scratchFS string) ([]stack.Image, [][]stack.Image) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	var keys []string
	var specs []stack.Spec
	var round []int
	add := func(r int, key string, sp stack.Spec) {
		keys, specs, round = append(keys, key), append(specs, sp), append(round, r)
	}
	n := 0
	for r := range z.Rounds {
		count := z.Images / z.Rounds
		if r < z.Images%z.Rounds {
			count++
		}
		for range count {
			kind := stack.MixedKinds[n%len(stack.MixedKinds)]
			virtual := int64(16+rng.IntN(49)) << 20
			add(r, fmt.Sprintf("chaos/r%d/%03d-%s", r, n, kind), stack.Spec{Kind: kind, Virtual: virtual, Data: int64(2+rng.IntN(5)) << 20, Seed: rng.Uint64()})
			n++
		}
		add(r, fmt.Sprintf("chaos/r%d/big-%03d", r, n), stack.Spec{Kind: stack.KindQcow2, Virtual: bigVirtual, Data: 8 << 20, Seed: rng.Uint64()})
		n++
	}
	add(0, "chaos/r0/hostile", stack.Spec{Kind: stack.KindBackingFile, Virtual: 64 << 20})
	var sfs syscall.Statfs_t
	if err := syscall.Statfs(scratchFS, &sfs); err != nil {
		t.Fatal(err)
	}
	// A disk whose data no job could ever fit in scratch, yet under the
	// 2 TiB cap: on a host with more free space than that, this case is
	// left out rather than converting terabytes.
	if huge := max(4*int64(sfs.Blocks)*sfs.Bsize, 64<<30); huge < 2<<40 {
		add(0, "chaos/r0/too-big-for-scratch", stack.Spec{Kind: stack.KindHuge, Virtual: huge})
	} else {
		t.Logf("scratch has %d GiB: the too-big-for-scratch case is left out", int64(sfs.Blocks)*sfs.Bsize>>30)
	}

	start := time.Now()
	imgs, err := stack.MakeAll(ctx, dir, keys, specs, true)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("built %d images and their expected outputs in %s", len(imgs), time.Since(start).Round(time.Millisecond))
	byRound := make([][]stack.Image, z.Rounds)
	for i, img := range imgs {
		byRound[round[i]] = append(byRound[round[i]], img)
	}
	for r := range byRound {
		w := byRound[r]
		rng.Shuffle(len(w), func(i, j int) { w[i], w[j] = w[j], w[i] })
		// The upload that waits for NATS to be down is a small convertible
		// one: the big ones are needed elsewhere.
		if i := slices.IndexFunc(w, func(img stack.Image) bool { return img.Fail == nil && img.Spec.Virtual < bigVirtual }); i >= 0 {
			w[i], w[len(w)-1] = w[len(w)-1], w[i]
		}
	}
	return imgs, byRound
}

func countFinal(rs []stack.Result) int {
	n := 0
	for _, r := range rs {
		if r.Final() {
			n++
		}
	}
	return n
}

// notified reports whether every final result has been posted to Slack.
func notified(rs []stack.Result, posts map[string]int) bool {
	for _, r := range rs {
		if r.Final() && posts[r.ID] == 0 {
			return false
		}
	}
	return true
}

func waitFor(ctx context.Context, cond func() bool) error {
	for !cond() {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
	return nil
}

// findings is what the audit found, as counts and the examples behind them.
type findings struct {
	outputs       int
	ready, failed int
	lost          []string
	duplicated    []string
	corrupted     []string
	wrongVerdict  []string
	undelivered   []string // results in the stream the consumer never got
	notifyMissing []string
	notifyDup     []string
	scratchLeft   []string
	multipartLeft []string
	qemuLeft      []string
}

func audit(ctx context.Context, t *testing.T, st *stack.Stack, imgs []stack.Image, results *stack.Results, slack *flakySlack, big map[string]bool) *findings {
	t.Helper()
	f := &findings{}
	all := results.All()
	for _, m := range results.Malformed() {
		f.corrupted = append(f.corrupted, "malformed result event "+m)
	}
	byKey := map[string][]stack.Result{}
	for _, r := range all {
		byKey[r.Key] = append(byKey[r.Key], r)
	}

	stored := map[string]minio.ObjectInfo{}
	for obj := range st.S3.ListObjects(ctx, stack.OutputBucket, minio.ListObjectsOptions{Recursive: true}) {
		if obj.Err != nil {
			t.Fatalf("list outputs: %v", obj.Err)
		}
		stored[obj.Key] = obj
	}
	expected := map[string]bool{}

	kv, err := st.JS.KeyValue(ctx, events.StatusBucket)
	if err != nil {
		t.Fatal(err)
	}
	statuses := status.New(kv, nil)

	for _, img := range imgs {
		var conv, finalFail []stack.Result
		for _, r := range byKey[img.Key] {
			switch {
			case r.Converted != nil:
				conv = append(conv, r)
			case r.Final():
				finalFail = append(finalFail, r)
			}
		}
		stRec, _ := statuses.Get(ctx, stack.InputBucket, img.Key)

		if img.Fail != nil {
			f.outputs++
			switch {
			case len(conv) > 0:
				f.wrongVerdict = append(f.wrongVerdict, fmt.Sprintf("%s converted, want a failure (%+v)", img.Key, *img.Fail))
			case len(finalFail) == 0:
				f.lost = append(f.lost, img.Key+": no final result")
			default:
				if len(finalFail) > 1 {
					f.duplicated = append(f.duplicated, fmt.Sprintf("%s: %d final failure events", img.Key, len(finalFail)))
				}
				fl := finalFail[0].Failed
				if fl.Phase != img.Fail.Phase || (img.Fail.Rule != "" && fl.Rule != img.Fail.Rule) || !strings.Contains(fl.Message, img.Fail.Contains) {
					f.wrongVerdict = append(f.wrongVerdict, fmt.Sprintf("%s failed in %s (rule %q): %s; want %+v", img.Key, fl.Phase, fl.Rule, fl.Message, *img.Fail))
				} else {
					f.failed++
				}
				if stRec.State != events.StateFailed {
					f.wrongVerdict = append(f.wrongVerdict, fmt.Sprintf("%s status %s, want FAILED", img.Key, stRec.State))
				}
			}
			continue
		}

		if len(finalFail) > 0 {
			fl := finalFail[0].Failed
			f.wrongVerdict = append(f.wrongVerdict, fmt.Sprintf("%s failed in %s after %d attempt(s): %s", img.Key, fl.Phase, fl.Attempt, fl.Message))
		}
		ok := len(finalFail) == 0
		for outKey, sum := range img.Outputs {
			f.outputs++
			expected[outKey] = true
			var evs []stack.Result
			for _, r := range conv {
				if r.Converted.OutputKey == outKey {
					evs = append(evs, r)
				}
			}
			obj, isStored := stored[outKey]
			switch {
			case len(evs) == 0:
				f.lost = append(f.lost, outKey+": no converted event")
				ok = false
			case len(evs) > 1:
				f.duplicated = append(f.duplicated, fmt.Sprintf("%s: %d converted events", outKey, len(evs)))
			}
			for _, r := range evs {
				if r.Converted.SHA256 != sum || r.Converted.OutputBucket != stack.OutputBucket {
					f.corrupted = append(f.corrupted, fmt.Sprintf("%s: event says %s/%s sha256 %s, local qemu-img convert gives %s", outKey, r.Converted.OutputBucket, r.Converted.OutputKey, r.Converted.SHA256, sum))
					ok = false
				}
			}
			if !isStored {
				if len(evs) > 0 {
					f.lost = append(f.lost, outKey+": reported but not stored")
				}
				ok = false
				continue
			}
			got, n, err := st.ObjectSHA256(ctx, stack.OutputBucket, outKey)
			if err != nil || got != sum || n != obj.Size {
				f.corrupted = append(f.corrupted, fmt.Sprintf("%s: stored sha256 %s (%d bytes, err %v), want %s", outKey, got, n, err, sum))
				ok = false
			}
		}
		if ok {
			f.ready++
		}
		if stRec.State != events.StateReady {
			f.wrongVerdict = append(f.wrongVerdict, fmt.Sprintf("%s status %s, want READY", img.Key, stRec.State))
		}
	}
	for key := range stored {
		if !expected[key] && !events.HasReservedSegment(key) { // the zero object is no output
			f.duplicated = append(f.duplicated, "unexpected output object "+key)
		}
	}

	// The stream holds exactly what the audit consumer read.
	if inStream, err := resultsInStream(ctx, st); err != nil {
		t.Errorf("read RESULTS: %v", err)
	} else if inStream != uint64(len(all)) {
		f.undelivered = append(f.undelivered, fmt.Sprintf("RESULTS holds %d result events, the audit consumer read %d", inStream, len(all)))
	}

	posts := slack.posts()
	finalIDs := map[string]bool{}
	for _, r := range all {
		if !r.Final() {
			continue
		}
		finalIDs[r.ID] = true
		switch n := posts[r.ID]; {
		case n == 0:
			f.notifyMissing = append(f.notifyMissing, fmt.Sprintf("%s (%s)", r.Key, r.ID))
		case n > 1:
			f.notifyDup = append(f.notifyDup, fmt.Sprintf("%s (%s) posted %d times", r.Key, r.ID, n))
		}
	}
	for id, n := range posts {
		if !finalIDs[id] {
			f.notifyDup = append(f.notifyDup, fmt.Sprintf("post for event %s, which is no final result (%d)", id, n))
		}
	}

	entries, _ := os.ReadDir(st.ScratchDir())
	for _, e := range entries {
		f.scratchLeft = append(f.scratchLeft, e.Name())
	}
	for _, p := range stack.ProcessesUsing(st.ScratchDir()) {
		f.qemuLeft = append(f.qemuLeft, fmt.Sprintf("pid %d: %s", p.PID, p.Cmdline))
	}
	// MinIO lists incomplete uploads per object name, not per bucket.
	var names []string
	for key := range expected {
		names = append(names, key)
	}
	for key := range big {
		names = append(names, key+".raw")
	}
	slices.Sort(names)
	for _, key := range slices.Compact(names) {
		res, err := st.Core.ListMultipartUploads(ctx, stack.OutputBucket, key, "", "", "", 1000)
		if err != nil {
			t.Errorf("list multipart uploads of %s: %v", key, err)
			continue
		}
		for _, u := range res.Uploads {
			f.multipartLeft = append(f.multipartLeft, fmt.Sprintf("%s (upload %s, started %s)", u.Key, u.UploadID, u.Initiated.Format(time.TimeOnly)))
		}
	}
	return f
}

// resultsInStream counts the result events in RESULTS, leaving out the
// queue alerts that share the stream.
func resultsInStream(ctx context.Context, st *stack.Stack) (uint64, error) {
	s, err := st.JS.Stream(ctx, events.StreamResults)
	if err != nil {
		return 0, err
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(events.SubjectResults))
	if err != nil {
		return 0, err
	}
	var n uint64
	for _, c := range info.State.Subjects {
		n += c
	}
	return n, nil
}

func (f *findings) print(t *testing.T, faults []fault, images int, faultsTook, total time.Duration) {
	t.Helper()
	var b strings.Builder
	w := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "FAULT\tTARGETED\tDETAIL")
	for _, x := range faults {
		fmt.Fprintf(w, "%s\t%v\t%s\n", x.Name, x.Targeted, x.Detail)
	}
	w.Flush()
	fmt.Fprintf(&b, "\nfaults injected %d in %s; settled after %s\n\n", len(faults), faultsTook.Round(time.Second), total.Round(time.Second))
	w = tabwriter.NewWriter(&b, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "jobs\toutputs\tready\tfailed as expected\tlost\tduplicated\tcorrupted\twrong verdict\tundelivered\tSlack missing\tSlack doubled\tscratch left\tmultipart left\tqemu-img left\t")
	fmt.Fprintf(w, "%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t%d\t\n", images, f.outputs, f.ready, f.failed,
		len(f.lost), len(f.duplicated), len(f.corrupted), len(f.wrongVerdict), len(f.undelivered),
		len(f.notifyMissing), len(f.notifyDup), len(f.scratchLeft), len(f.multipartLeft), len(f.qemuLeft))
	w.Flush()
	t.Log("\n" + b.String())
}

func (f *findings) check(t *testing.T) {
	t.Helper()
	for _, c := range []struct {
		what string
		list []string
	}{
		{"lost", f.lost},
		{"duplicated", f.duplicated},
		{"corrupted", f.corrupted},
		{"wrong verdict", f.wrongVerdict},
		{"result not delivered to a consumer", f.undelivered},
		{"notification missing", f.notifyMissing},
		{"notification posted twice", f.notifyDup},
		{"scratch entry left behind", f.scratchLeft},
		{"incomplete multipart upload left in the output bucket", f.multipartLeft},
		{"qemu-img still running in scratch", f.qemuLeft},
	} {
		for _, x := range c.list {
			t.Errorf("%s: %s", c.what, x)
		}
	}
}
