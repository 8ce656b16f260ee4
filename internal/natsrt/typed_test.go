package natsrt_test

import (
	"context"
	"encoding/json"
	"log/slog"
	"testing"
	"time"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/natsrt"
)

func convertJob(t *testing.T, typ string) []byte {
	t.Helper()
	ev, err := events.New("job-1", typ, "/test", "disks/a.vhdx", time.Now(),
		events.ConvertJob{JobID: "job-1", Bucket: "uploads", Key: "disks/a.vhdx"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(ev)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestTypedHandsTheHandlerTheDecodedEventAndItsDelivery(t *testing.T) {
	var got events.ConvertJob
	var gotD natsrt.Delivery
	h := natsrt.Typed(events.TypeConvertJob, func(_ context.Context, job events.ConvertJob, d natsrt.Delivery) ([]events.Message, error) {
		got, gotD = job, d
		return nil, nil
	})
	d := natsrt.Delivery{Attempt: 2, MaxAttempts: 4}
	if _, err := h(context.Background(), convertJob(t, events.TypeConvertJob), d); err != nil {
		t.Fatal(err)
	}
	if got.JobID != "job-1" || got.Bucket != "uploads" || got.Key != "disks/a.vhdx" || gotD != d {
		t.Errorf("handler got %+v, %+v", got, gotD)
	}
}

func TestTypedRefusesForGoodWhatIsNotItsEventType(t *testing.T) {
	called := false
	h := natsrt.Typed(events.TypeConvertJob, func(context.Context, events.ConvertJob, natsrt.Delivery) ([]events.Message, error) {
		called = true
		return nil, nil
	})
	for name, data := range map[string][]byte{
		"not JSON":       []byte("garbage"),
		"another type":   convertJob(t, events.TypeConverted),
		"no cloud event": []byte(`{"Records":[]}`),
	} {
		_, err := h(context.Background(), data, natsrt.Delivery{Attempt: 1, MaxAttempts: 4})
		fe, ok := failure.As(err)
		if !ok || !fe.Permanent || fe.Phase != events.PhaseIntake {
			t.Errorf("%s: %v, want a permanent intake failure", name, err)
		}
	}
	if called {
		t.Error("the handler saw a message it cannot read")
	}
}

func TestAnyEventPassesEveryTypeAndRefusesWhatIsNoCloudEvent(t *testing.T) {
	var types []string
	h := natsrt.AnyEvent(events.PhasePublish, func(_ context.Context, ev events.Event, _ natsrt.Delivery) ([]events.Message, error) {
		types = append(types, ev.Type)
		return nil, nil
	})
	for _, typ := range []string{events.TypeConverted, events.TypeConvertJob} {
		if _, err := h(context.Background(), convertJob(t, typ), natsrt.Delivery{}); err != nil {
			t.Fatal(err)
		}
	}
	if len(types) != 2 || types[0] != events.TypeConverted || types[1] != events.TypeConvertJob {
		t.Errorf("handler saw %v", types)
	}
	_, err := h(context.Background(), []byte("garbage"), natsrt.Delivery{})
	if fe, ok := failure.As(err); !ok || !fe.Permanent || fe.Phase != events.PhasePublish {
		t.Errorf("garbage: %v, want a permanent failure of the phase given", err)
	}
}

func TestDescribeNamesTheInputOrNothing(t *testing.T) {
	describe := natsrt.Describe(events.TypeConvertJob, func(job events.ConvertJob) events.JobRef {
		return events.JobRef{ID: job.JobID, Bucket: job.Bucket, Key: job.Key}
	})
	if got := describe(convertJob(t, events.TypeConvertJob)); got != (events.JobRef{ID: "job-1", Bucket: "uploads", Key: "disks/a.vhdx"}) {
		t.Errorf("described as %+v", got)
	}
	if got := describe([]byte("garbage")); got != (events.JobRef{}) {
		t.Errorf("garbage described as %+v", got)
	}
}

func TestTypedExhaustedReportsWhatItCanReadOnly(t *testing.T) {
	var deliveries int
	report := natsrt.TypedExhausted(events.TypeConvertJob, func(_ context.Context, job events.ConvertJob, n int) []events.Message {
		deliveries = n
		return []events.Message{{Subject: "out." + job.JobID}}
	}, slog.New(slog.DiscardHandler))
	if out := report(context.Background(), convertJob(t, events.TypeConvertJob), 8); len(out) != 1 || out[0].Subject != "out.job-1" || deliveries != 8 {
		t.Errorf("report = %+v after %d deliveries", out, deliveries)
	}
	if out := report(context.Background(), []byte("garbage"), 8); out != nil {
		t.Errorf("an unreadable message was reported: %+v", out)
	}
}
