package dedup_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/caarlos0/env/v11"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/dedup"
	"github.com/imagepipe/imagepipe/internal/natstest"
)

func startJetStream(t *testing.T) jetstream.JetStream {
	_, js := natstest.Start(t)
	return js
}

func open(t *testing.T, js jetstream.JetStream, maxAge time.Duration) *dedup.Store {
	t.Helper()
	s, err := dedup.Open(context.Background(), js, maxAge)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestLookupFindsWhatPutRecordedForTheSameContentAndFormatOnly(t *testing.T) {
	ctx := context.Background()
	s := open(t, startJetStream(t), 0)
	content := dedup.ContentKey(`"8b945bef478408cf6744e493a0454030-2"`, 25165824)
	at := time.Date(2026, 11, 23, 8, 0, 0, 0, time.FixedZone("CET", 3600))
	in := dedup.Record{
		OutputBucket: "images", OutputKey: "disks/a.vhdx.raw", SHA256: "ab12", Size: 64 << 20,
		JobID: "j1", InputBucket: "uploads", InputKey: "disks/a.vhdx", InputFormat: "vhdx", VirtualSize: 64 << 20,
		CreatedAt: at,
	}
	if err := s.Put(ctx, content, "raw", in); err != nil {
		t.Fatal(err)
	}

	got, found, err := s.Lookup(ctx, content, "raw")
	if err != nil || !found {
		t.Fatalf("Lookup = found %v, err %v; want the record", found, err)
	}
	want := in
	want.ContentKey, want.OutputFormat, want.CreatedAt = content, "raw", at.UTC()
	if got != want {
		t.Errorf("record =\n%+v\nwant\n%+v", got, want)
	}
	if got.Output() != "images/disks/a.vhdx.raw" {
		t.Errorf("Output() = %q", got.Output())
	}

	for _, miss := range []struct{ content, format string }{
		{content, "qcow2"},
		{dedup.ContentKey("8b945bef478408cf6744e493a0454030-2", 25165825), "raw"},
		{dedup.ContentKey("8b945bef478408cf6744e493a0454030-3", 25165824), "raw"},
	} {
		if _, found, err := s.Lookup(ctx, miss.content, miss.format); found || err != nil {
			t.Errorf("Lookup(%s, %s) = found %v, err %v; want no record", miss.content, miss.format, found, err)
		}
	}
}

func TestPutReplacesTheRecordAndForgetRemovesIt(t *testing.T) {
	ctx := context.Background()
	s := open(t, startJetStream(t), 0)
	key := dedup.ContentKeySHA256(strings.Repeat("AB", 32))
	for _, out := range []string{"first.raw", "second.raw"} {
		if err := s.Put(ctx, key, "raw", dedup.Record{OutputBucket: "images", OutputKey: out}); err != nil {
			t.Fatal(err)
		}
	}
	r, found, err := s.Lookup(ctx, key, "raw")
	if err != nil || !found || r.OutputKey != "second.raw" || r.CreatedAt.IsZero() {
		t.Fatalf("Lookup = %+v found %v err %v; want the second record with a creation time", r, found, err)
	}
	if err := s.Forget(ctx, key, "raw"); err != nil {
		t.Fatal(err)
	}
	if _, found, err := s.Lookup(ctx, key, "raw"); found || err != nil {
		t.Errorf("after Forget: found %v err %v", found, err)
	}
	if err := s.Forget(ctx, key, "raw"); err != nil {
		t.Errorf("forgetting a missing record: %v", err)
	}
}

func TestPutAndLookupRefuseIncompleteArguments(t *testing.T) {
	ctx := context.Background()
	s := open(t, startJetStream(t), 0)
	ok := dedup.Record{OutputBucket: "images", OutputKey: "a.raw"}
	for name, call := range map[string]func() error{
		"empty content key": func() error { return s.Put(ctx, "", "raw", ok) },
		"empty format":      func() error { return s.Put(ctx, dedup.ContentKey("e", 1), "", ok) },
		"format with a dot": func() error { return s.Put(ctx, dedup.ContentKey("e", 1), "raw.x", ok) },
		"no output":         func() error { return s.Put(ctx, dedup.ContentKey("e", 1), "raw", dedup.Record{OutputBucket: "images"}) },
		"lookup without format": func() error {
			_, _, err := s.Lookup(ctx, dedup.ContentKey("e", 1), "")
			return err
		},
	} {
		if err := call(); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestContentKeysAreValidKVKeysAndNeverCollide(t *testing.T) {
	keys := map[string]string{}
	for _, k := range []string{
		dedup.ContentKey("abc", 10),
		dedup.ContentKey("abc", 100),
		dedup.ContentKey("abc-1", 0),
		dedup.ContentKey("abc_1", 0),
		dedup.ContentKey("a.b/c=d e", 7),
		dedup.ContentKey("", 0),
		dedup.ContentKeySHA256("ABCDEF"),
		dedup.ContentKeySHA256("abcdef0"),
	} {
		for _, c := range k {
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("-_=", c)) {
				t.Errorf("content key %q holds %q", k, c)
			}
		}
		if prev, dup := keys[k]; dup {
			t.Errorf("content key %q made twice (%s)", k, prev)
		}
		keys[k] = k
	}
	if dedup.ContentKey(`"abc"`, 3) != dedup.ContentKey("abc", 3) {
		t.Error("a quoted ETag gives another key than the bare one")
	}
	if dedup.ContentKeySHA256("ABCDEF") != dedup.ContentKeySHA256("abcdef") {
		t.Error("hex case changes the sha256 content key")
	}
}

func TestPruneRemovesOnlyRecordsOlderThanTheAge(t *testing.T) {
	ctx := context.Background()
	js := startJetStream(t)
	s := open(t, js, 0)
	now := time.Date(2026, 11, 23, 8, 0, 0, 0, time.UTC)
	ages := map[string]time.Duration{"old": 100 * 24 * time.Hour, "edge": 89 * 24 * time.Hour, "new": time.Hour}
	for name, age := range ages {
		r := dedup.Record{OutputBucket: "images", OutputKey: name + ".raw", CreatedAt: now.Add(-age)}
		if err := s.Put(ctx, dedup.ContentKey(name, 1), "raw", r); err != nil {
			t.Fatal(err)
		}
	}
	// A record nothing can read is pruned whatever its age.
	kv, err := js.KeyValue(ctx, events.DedupBucket)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, dedup.ContentKey("garbage", 1)+".raw", []byte("{not json")); err != nil {
		t.Fatal(err)
	}

	n, err := s.Prune(ctx, 90*24*time.Hour, now)
	if err != nil {
		t.Fatal(err)
	}
	if n != 2 {
		t.Errorf("pruned %d records, want 2 (old and garbage)", n)
	}
	for name, want := range map[string]bool{"old": false, "edge": true, "new": true, "garbage": false} {
		if _, found, _ := s.Lookup(ctx, dedup.ContentKey(name, 1), "raw"); found != want {
			t.Errorf("after prune %s found = %v, want %v", name, found, want)
		}
	}
	if n, err := s.Prune(ctx, 90*24*time.Hour, now); n != 0 || err != nil {
		t.Errorf("second prune = %d, %v; want nothing left to prune", n, err)
	}
}

func TestRecordsExpireOnTheirOwnAfterMaxAge(t *testing.T) {
	ctx := context.Background()
	s := open(t, startJetStream(t), time.Second)
	key := dedup.ContentKey("short-lived", 1)
	if err := s.Put(ctx, key, "raw", dedup.Record{OutputBucket: "images", OutputKey: "a.raw"}); err != nil {
		t.Fatal(err)
	}
	if _, found, _ := s.Lookup(ctx, key, "raw"); !found {
		t.Fatal("record missing right after Put")
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, found, err := s.Lookup(ctx, key, "raw")
		if err != nil {
			t.Fatal(err)
		}
		if !found {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("record still there 5s after a 1s max age")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestConfigParsesOnOffHashAndDays(t *testing.T) {
	tests := []struct {
		env     map[string]string
		want    dedup.Config
		wantErr bool
	}{
		{env: map[string]string{}, want: dedup.Config{Enabled: true, Hash: dedup.HashETag, MaxAge: dedup.Age(90 * 24 * time.Hour)}},
		{env: map[string]string{"IMAGEPIPE_DEDUP": "off", "IMAGEPIPE_DEDUP_HASH": "SHA256", "IMAGEPIPE_DEDUP_MAX_AGE": "36h"},
			want: dedup.Config{Enabled: false, Hash: dedup.HashSHA256, MaxAge: dedup.Age(36 * time.Hour)}},
		{env: map[string]string{"IMAGEPIPE_DEDUP": "maybe"}, wantErr: true},
		{env: map[string]string{"IMAGEPIPE_DEDUP_HASH": "md5"}, wantErr: true},
		{env: map[string]string{"IMAGEPIPE_DEDUP_MAX_AGE": "-1d"}, wantErr: true},
	}
	for _, tt := range tests {
		var c dedup.Config
		err := env.ParseWithOptions(&c, env.Options{Environment: tt.env})
		if (err != nil) != tt.wantErr {
			t.Errorf("env %v: err %v, want error %v", tt.env, err, tt.wantErr)
			continue
		}
		if err == nil && c != tt.want {
			t.Errorf("env %v: config %+v, want %+v", tt.env, c, tt.want)
		}
	}
}

func TestParseAgeAcceptsDaysAndGoDurations(t *testing.T) {
	for in, want := range map[string]time.Duration{"90d": 90 * 24 * time.Hour, "0d": 0, "36h": 36 * time.Hour, "1h30m": 90 * time.Minute} {
		got, err := dedup.ParseAge(in)
		if err != nil || got != want {
			t.Errorf("ParseAge(%q) = %s, %v; want %s", in, got, err, want)
		}
	}
	for _, in := range []string{"", "d", "1.5d", "ninety days", "-2h", "99999999999999d"} {
		if _, err := dedup.ParseAge(in); err == nil {
			t.Errorf("ParseAge(%q) succeeded", in)
		}
	}
	if s := dedup.Age(90 * 24 * time.Hour).String(); s != "90d" {
		t.Errorf("Age(90 days) prints %q", s)
	}
}
