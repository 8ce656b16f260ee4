//go:build linux

package chaos

import (
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"sync"
	"sync/atomic"
)

// flakySlack is a Slack incoming webhook that answers 500 while down and
// records, per result event, the posts it accepted.
type flakySlack struct {
	srv      *httptest.Server
	down     atomic.Bool
	refused  atomic.Int64
	mu       sync.Mutex
	accepted map[string]int // event id → posts answered 200
	unknown  int            // accepted posts naming no event
}

// Every message names its event in its context line: "imagepipe · event ID".
var eventIDInPost = regexp.MustCompile(`event ([0-9a-f-]{36})`)

func newFlakySlack() *flakySlack {
	s := &flakySlack{accepted: map[string]int{}}
	s.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if s.down.Load() {
			s.refused.Add(1)
			http.Error(w, "internal_error", http.StatusInternalServerError)
			return
		}
		var m map[string]any
		if r.Method != http.MethodPost || json.Unmarshal(body, &m) != nil || m["text"] == nil {
			http.Error(w, "invalid_payload", http.StatusBadRequest)
			return
		}
		s.mu.Lock()
		if id := eventIDInPost.FindSubmatch(body); id != nil {
			s.accepted[string(id[1])]++
		} else {
			s.unknown++
		}
		s.mu.Unlock()
		io.WriteString(w, "ok")
	}))
	return s
}

func (s *flakySlack) URL() string { return s.srv.URL + "/services/T000/B000/CHAOS" }

// posts returns how many posts were accepted for each event.
func (s *flakySlack) posts() map[string]int {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make(map[string]int, len(s.accepted))
	for k, v := range s.accepted {
		out[k] = v
	}
	return out
}
