package notify_test

import (
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/imagepipe/imagepipe/functions/notify"
)

// A receiver checks the signature against the raw body before it trusts or
// even parses it.
func ExampleVerifySignature() {
	const secret = "whsec-example"
	receive := func(w http.ResponseWriter, r *http.Request) {
		body, err := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		if err != nil {
			http.Error(w, "read error", http.StatusBadRequest)
			return
		}
		if err := notify.VerifySignature(secret, r.Header.Get(notify.SignatureHeader), body, time.Now(), 5*time.Minute); err != nil {
			http.Error(w, "bad signature", http.StatusUnauthorized)
			return
		}
		// body is the CloudEvent; events.Decode(body) parses it.
		w.WriteHeader(http.StatusNoContent)
	}
	_ = receive

	body := []byte(`{"specversion":"1.0","id":"ev-1","source":"imagepipe/convert","type":"io.imagepipe.image.converted"}`)
	sent := time.Unix(1_790_000_000, 0)
	header := notify.Sign(secret, body, sent)
	fmt.Println(header)
	fmt.Println(notify.VerifySignature(secret, header, body, sent.Add(30*time.Second), 5*time.Minute))
	fmt.Println(notify.VerifySignature(secret, header, append(body, ' '), sent, 5*time.Minute))
	fmt.Println(notify.VerifySignature(secret, header, body, sent.Add(time.Hour), 5*time.Minute))
	// Output:
	// t=1790000000,v1=5dc06f5b2040a2c8e4a3c0c73cf17cdb95434e2acad453f05a0cd3b33912fba6
	// <nil>
	// signature does not match body
	// signature timestamp outside tolerance: signed 1h0m0s ago
}
