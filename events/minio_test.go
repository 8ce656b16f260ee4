package events_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/imagepipe/imagepipe/events"
)

// A notification exactly as MinIO publishes it for a multipart upload.
const multipartPayload = `{"EventName":"s3:ObjectCreated:CompleteMultipartUpload","Key":"uploads/incoming/win11.vhdx",
 "Records":[{"eventVersion":"2.0","eventSource":"minio:s3","eventTime":"2026-11-23T07:45:27.775Z",
 "eventName":"s3:ObjectCreated:CompleteMultipartUpload",
 "s3":{"bucket":{"name":"uploads"},"object":{"key":"incoming%2Fwin11.vhdx","size":25165824,
 "eTag":"8b945bef478408cf6744e493a0454030-2","contentType":"application/octet-stream","sequencer":"18EA9CE969A00B93"}}}]}`

func payload(event, key string, size int64) string {
	return fmt.Sprintf(`{"EventName":%q,"Key":"uploads/x","Records":[{"eventVersion":"2.0","eventSource":"minio:s3",
"eventTime":"2026-11-23T07:45:27.775Z","eventName":%q,"s3":{"bucket":{"name":"uploads"},
"object":{"key":%q,"size":%d,"eTag":"\"abc\"","versionId":"v1","userMetadata":{"X-Amz-Meta-Imagepipe-Output":"true"}}}}]}`,
		event, event, key, size)
}

func TestParseNotificationDecodesKeysExactlyOnce(t *testing.T) {
	tests := []struct {
		name, wireKey, want string
	}{
		{"slash", "incoming%2Fwin11.vhdx", "incoming/win11.vhdx"},
		{"space as plus", "my+disk.vhdx", "my disk.vhdx"},
		{"literal plus", "a%2Bb.vhdx", "a+b.vhdx"},
		{"percent stays decoded once", "100%2525.vhdx", "100%25.vhdx"},
		{"unicode", "d%C3%ADsk%2F%E6%97%A5%E6%9C%AC.vmdk", "dísk/日本.vmdk"},
		{"dot segments kept verbatim", "a%2F..%2F..%2Fetc%2Fpasswd", "a/../../etc/passwd"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n, err := events.ParseNotification([]byte(payload("s3:ObjectCreated:Put", tt.wireKey, 10)))
			if err != nil {
				t.Fatal(err)
			}
			if got := n.Records[0].Key; got != tt.want {
				t.Errorf("key = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestParseNotificationReadsMinIOMultipartEvent(t *testing.T) {
	n, err := events.ParseNotification([]byte(multipartPayload))
	if err != nil {
		t.Fatal(err)
	}
	if len(n.Records) != 1 {
		t.Fatalf("records = %d, want 1", len(n.Records))
	}
	r := n.Records[0]
	want := events.Record{
		EventName:   "s3:ObjectCreated:CompleteMultipartUpload",
		EventTime:   time.Date(2026, 11, 23, 7, 45, 27, 775e6, time.UTC),
		Bucket:      "uploads",
		Key:         "incoming/win11.vhdx",
		Size:        25165824,
		ETag:        "8b945bef478408cf6744e493a0454030-2",
		ContentType: "application/octet-stream",
		Sequencer:   "18EA9CE969A00B93",
	}
	if fmt.Sprint(r) != fmt.Sprint(want) {
		t.Errorf("record =\n%+v\nwant\n%+v", r, want)
	}
	if !r.Created() {
		t.Error("Created() = false for an ObjectCreated event")
	}
}

func TestParseNotificationKeepsVersionETagAndMetadata(t *testing.T) {
	n, err := events.ParseNotification([]byte(payload("s3:ObjectCreated:Copy", "k.vhdx", 5)))
	if err != nil {
		t.Fatal(err)
	}
	r := n.Records[0]
	if r.ETag != "abc" || r.VersionID != "v1" || r.UserMetadata["X-Amz-Meta-Imagepipe-Output"] != "true" {
		t.Errorf("got etag %q version %q meta %v", r.ETag, r.VersionID, r.UserMetadata)
	}
}

func TestParseNotificationRejectsMalformedPayloads(t *testing.T) {
	tests := map[string]string{
		"not json":        `{"EventName":`,
		"no records":      `{"EventName":"s3:ObjectCreated:Put","Records":[]}`,
		"no bucket":       `{"Records":[{"eventName":"s3:ObjectCreated:Put","s3":{"object":{"key":"a"}}}]}`,
		"no key":          `{"Records":[{"eventName":"s3:ObjectCreated:Put","s3":{"bucket":{"name":"b"},"object":{}}}]}`,
		"bad escape":      `{"Records":[{"eventName":"s3:ObjectCreated:Put","s3":{"bucket":{"name":"b"},"object":{"key":"%zz"}}}]}`,
		"negative size":   `{"Records":[{"eventName":"s3:ObjectCreated:Put","s3":{"bucket":{"name":"b"},"object":{"key":"a","size":-1}}}]}`,
		"no event name":   `{"Records":[{"s3":{"bucket":{"name":"b"},"object":{"key":"a"}}}]}`,
		"bad event time":  `{"Records":[{"eventName":"x","eventTime":"yesterday","s3":{"bucket":{"name":"b"},"object":{"key":"a"}}}]}`,
		"records not arr": `{"Records":{}}`,
	}
	for name, p := range tests {
		t.Run(name, func(t *testing.T) {
			if _, err := events.ParseNotification([]byte(p)); err == nil {
				t.Errorf("ParseNotification(%s) succeeded, want an error", p)
			}
		})
	}
}

func FuzzParseNotification(f *testing.F) {
	f.Add([]byte(multipartPayload))
	f.Add([]byte(payload("s3:ObjectCreated:Put", "a%2Fb+c.vhdx", 1)))
	f.Add([]byte(`{"Records":[{"eventName":"x","s3":{"bucket":{"name":"b"},"object":{"key":"%"}}}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		n, err := events.ParseNotification(b)
		if err != nil {
			return
		}
		for _, r := range n.Records {
			if r.Bucket == "" || r.Key == "" || r.EventName == "" || r.Size < 0 {
				t.Fatalf("accepted an incomplete record: %+v", r)
			}
		}
	})
}

func ExampleParseNotification() {
	n, err := events.ParseNotification([]byte(multipartPayload))
	if err != nil {
		panic(err)
	}
	r := n.Records[0]
	fmt.Println(r.EventName, r.Bucket, r.Key, r.Size)
	// Output: s3:ObjectCreated:CompleteMultipartUpload uploads incoming/win11.vhdx 25165824
}
