package convert

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/natstest"
	"github.com/imagepipe/imagepipe/internal/objstore"
	"github.com/imagepipe/imagepipe/internal/qemuimg"
	"github.com/imagepipe/imagepipe/internal/status"
)

// statCounter is the real store, counting the Stats of each object and
// noting which came before the job's first write of an output.
type statCounter struct {
	Storage
	mu      sync.Mutex
	writing bool
	before  map[string]int // bucket/key: Stats before the first write
	total   map[string]int // bucket/key: every Stat
}

func (s *statCounter) Stat(ctx context.Context, bucket, key string) (objstore.Object, error) {
	s.mu.Lock()
	if s.total == nil {
		s.before, s.total = map[string]int{}, map[string]int{}
	}
	s.total[bucket+"/"+key]++
	if !s.writing {
		s.before[bucket+"/"+key]++
	}
	s.mu.Unlock()
	return s.Storage.Stat(ctx, bucket, key)
}

func (s *statCounter) wrote() {
	s.mu.Lock()
	s.writing = true
	s.mu.Unlock()
}

func (s *statCounter) UploadGrowing(ctx context.Context, bucket, key string, src objstore.Growing, size int64, meta map[string]string, progress io.Reader, guard objstore.Guard) (objstore.Object, error) {
	s.wrote()
	return s.Storage.UploadGrowing(ctx, bucket, key, src, size, meta, progress, guard)
}

func (s *statCounter) Copy(ctx context.Context, srcBucket, srcKey, srcVersion, srcETag, dstBucket, dstKey string, meta, tags map[string]string, guard objstore.Guard) (objstore.Object, error) {
	s.wrote()
	return s.Storage.Copy(ctx, srcBucket, srcKey, srcVersion, srcETag, dstBucket, dstKey, meta, tags, guard)
}

// requestCounts is the "requests" debug line a job logged to logs, nil if
// none.
func requestCounts(t *testing.T, logs *natstest.LogBuffer) map[string]int {
	t.Helper()
	all := logs.String()
	var found map[string]int
	sc := bufio.NewScanner(strings.NewReader(all))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var line struct {
			Msg      string         `json:"msg"`
			Requests map[string]int `json:"requests"`
		}
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			t.Fatalf("log line %q: %v", sc.Text(), err)
		}
		if line.Msg == "requests" {
			if found != nil {
				t.Fatalf("more than one requests line for one job:\n%s", all)
			}
			found = line.Requests
		}
	}
	return found
}

// countingHandler is a convert replica on s whose store counts Stats and
// whose log is kept, raw outputs streamed as in production.
func (s *realStack) countingHandler(t *testing.T) (*Handler, *statCounter, *natstest.LogBuffer) {
	t.Helper()
	counter := &statCounter{Storage: s.Store}
	logs := &natstest.LogBuffer{}
	log := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	cfg := Config{OutputBucket: s.Out, OutputFormat: "raw", ScratchDir: t.TempDir(), MaxVirtualSize: 1 << 40,
		ConvertTimeoutBase: time.Minute, ConvertTimeoutPerGiB: time.Minute, AckWait: time.Minute, StreamOutput: true}
	h := New(cfg, counter, qemuimg.New(nil), status.New(s.KV, nil), nil, log)
	h.streamAbove = 0 // the test image is smaller than one part
	return h, counter, logs
}

// checkStats asserts the job's look before its first write (one Stat of
// the input, one of the output) and its Stats in all, the write's own
// checks included: one of the input just before the output completes,
// and, before it is tagged, one of each (conversions only).
func checkStats(t *testing.T, c *statCounter, logs *natstest.LogBuffer, in, out string, maxIn, maxOut int) {
	t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.before[in] > 1 || c.before[out] > 1 {
		t.Errorf("before its first write the job made %d Stats of the input and %d of the output, want at most one of each", c.before[in], c.before[out])
	}
	if c.total[in] > maxIn || c.total[out] > maxOut {
		t.Errorf("the job made %d Stats of the input and %d of the output in all, want at most %d and %d", c.total[in], c.total[out], maxIn, maxOut)
	}
	all := 0
	for _, n := range c.total {
		all += n
	}
	counts := requestCounts(t, logs)
	t.Logf("Stats before the first write %v, in all %v; the job's requests line %v", c.before, c.total, counts)
	if counts == nil {
		t.Fatal("the job logged no requests line")
	}
	if counts[reqStat] != all {
		t.Errorf("the requests line counts %d Stats, the store saw %d (%v)", counts[reqStat], all, counts)
	}
	if counts[reqKVPut] == 0 || counts[reqPublish] == 0 {
		t.Errorf("the requests line counts no status write or publish: %v", counts)
	}
}

func TestAConvertedRawJobLooksAtItsInputAndOutputOnceEach(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s, job, rawSHA := queuedVHDX(ctx, t)
	h, counter, logs := s.countingHandler(t)
	out, err := h.Handle(ctx, job, 1, 4)
	if err != nil || len(out) != 1 || out[0].Subject != events.SubjectConverted {
		t.Fatalf("Handle = %+v, %v; want one converted event", out, err)
	}
	if sum := storedSHA256(t, s.Store, s.Out, "disks/win.vhdx.raw"); sum != rawSHA {
		t.Fatalf("output sha256 %s, want %s", sum, rawSHA)
	}
	checkStats(t, counter, logs, s.In+"/disks/win.vhdx", s.Out+"/disks/win.vhdx.raw", 3, 2)
}

func TestARawUploadCopiedServerSideLooksAtItsInputAndOutputOnceEach(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	s := startRealStack(t)
	body := bytes.Repeat([]byte("imagepipe raw disk "), 1<<16)[:1<<20]
	job := s.queue(ctx, t, "disks/plain.raw", body)
	h, counter, logs := s.countingHandler(t)
	out, err := h.Handle(ctx, job, 1, 4)
	if err != nil || len(out) != 1 || out[0].Subject != events.SubjectConverted {
		t.Fatalf("Handle = %+v, %v; want one converted event", out, err)
	}
	if sum, want := storedSHA256(t, s.Store, s.Out, "disks/plain.raw.raw"), sha256.Sum256(body); sum != hex.EncodeToString(want[:]) {
		t.Fatalf("output sha256 %s, want %s", sum, want)
	}
	checkStats(t, counter, logs, s.In+"/disks/plain.raw", s.Out+"/disks/plain.raw.raw", 2, 1)
}
