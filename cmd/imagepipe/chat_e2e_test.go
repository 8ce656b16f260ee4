package main

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imagepipe/imagepipe/events"
)

// discordRecorder is a Discord webhook on loopback that keeps the payloads
// it is sent and answers as Discord does.
type discordRecorder struct {
	srv      *httptest.Server
	mu       sync.Mutex
	payloads [][]byte
}

func newDiscordRecorder(t *testing.T) *discordRecorder {
	r := &discordRecorder{}
	r.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		body, _ := io.ReadAll(req.Body)
		if req.Method != http.MethodPost || !json.Valid(body) {
			http.Error(w, `{"message": "Cannot send an empty message", "code": 50006}`, http.StatusBadRequest)
			return
		}
		r.mu.Lock()
		r.payloads = append(r.payloads, body)
		r.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	}))
	t.Cleanup(r.srv.Close)
	return r
}

// await returns the first payload whose JSON holds s.
func (r *discordRecorder) await(t *testing.T, s string, timeout time.Duration) []byte {
	t.Helper()
	deadline := time.Now().Add(scaled(timeout))
	for {
		r.mu.Lock()
		for _, p := range r.payloads {
			if bytes.Contains(p, []byte(s)) {
				r.mu.Unlock()
				return p
			}
		}
		r.mu.Unlock()
		if time.Now().After(deadline) {
			t.Fatalf("Discord got no message holding %q within %s", s, timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestDiscordShowsALinkInjectedThroughAnObjectKeyAsText(t *testing.T) {
	discord := newDiscordRecorder(t)
	side := startSideStack(t, func(s *settings) {
		s.Notify.DiscordWebhookURL = discord.srv.URL + "/api/webhooks/1/token"
		s.Notify.NotifyOn = []string{"success", "failure"}
	})
	// S3 keys cannot hold "//" (MinIO refuses them), so the key carries
	// the link's shape and the image carries the link itself: a qcow2
	// naming it as its backing file, which the refusal quotes.
	const link = "[Re-download the fixed image](https://evil.example/x)"
	key := "e2e/chat/[Re-download the fixed image](evil).qcow2"
	img := filepath.Join(t.TempDir(), "link.qcow2")
	runTool(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", link, "-F", "raw", img, "1M")
	body, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	ch := side.results(t)
	side.put(t, "uploads", key, body)
	ev := side.await(t, ch, key, 60*time.Second)
	var f events.Failed
	if err := ev.DecodeData(events.TypeFailed, &f); err != nil || !strings.Contains(f.Message, link) {
		t.Fatalf("result %s %s, want a failure quoting the backing file", ev.Type, ev.Data)
	}

	payload := discord.await(t, "Re\\\\-download the fixed image", 30*time.Second)
	var p struct {
		Embeds []struct {
			Title       string `json:"title"`
			Description string `json:"description"`
			Fields      []struct {
				Name  string `json:"name"`
				Value string `json:"value"`
			} `json:"fields"`
		} `json:"embeds"`
		AllowedMentions struct {
			Parse []string `json:"parse"`
		} `json:"allowed_mentions"`
	}
	if err := json.Unmarshal(payload, &p); err != nil || len(p.Embeds) != 1 {
		t.Fatalf("payload %s: %v", payload, err)
	}
	if p.AllowedMentions.Parse == nil || len(p.AllowedMentions.Parse) != 0 {
		t.Errorf("allowed_mentions %s, want mentions off", payload)
	}
	e := p.Embeds[0]
	texts := map[string]string{"title": e.Title, "description": e.Description}
	for _, f := range e.Fields {
		texts[f.Name] = f.Value
	}
	// Discord renders "[text](url)" in descriptions and field values as a
	// link, and "https://..." as an autolink; escaped, both are text.
	const escapedKey = `e2e/chat/\[Re\-download the fixed image\]\(evil\).qcow2`
	for _, where := range []string{"title", "description", "Image"} {
		if !strings.Contains(texts[where], escapedKey) {
			t.Errorf("%s does not show the key escaped: %q", where, texts[where])
		}
	}
	const escapedLink = `\[Re\-download the fixed image\]\(https\://evil.example/x\)`
	for _, where := range []string{"description", "Error"} {
		if !strings.Contains(texts[where], escapedLink) {
			t.Errorf("%s does not show the quoted link escaped: %q", where, texts[where])
		}
	}
	for where, text := range texts {
		if strings.Contains(text, "](") || strings.Contains(text, "https://") {
			t.Errorf("%s holds a link Discord would render: %q", where, text)
		}
	}
}
