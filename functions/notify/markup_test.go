package notify_test

import (
	"encoding/json"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/functions/notify"
)

// injectedLink is a masked link an uploader can put in an object key.
const injectedLink = "[Re-download the fixed image](https://evil.example/x)"

func injectedLinkFailure(t *testing.T) events.Event {
	key := "x/" + injectedLink + ".vhdx"
	return mustEvent(t, "ev-link", events.TypeFailed, key, events.Failed{
		JobID: "j-1", InputBucket: "uploads", InputKey: key,
		Phase: events.PhaseInspect, Message: `"` + key + `" is not a disk image`,
		Suggestion: "upload a *real* image", Rule: "not-an-image", Attempt: 1,
	})
}

// canonicalJSON re-encodes a JSON document with sorted keys and no layout,
// so that two documents compare equal exactly when they hold the same
// values.
func canonicalJSON(t *testing.T, doc string) string {
	t.Helper()
	var v any
	if err := json.Unmarshal([]byte(doc), &v); err != nil {
		t.Fatalf("JSON does not parse: %v\n%s", err, doc)
	}
	return string(mustJSON(t, v))
}

func TestDiscordRendersALinkInjectedThroughTheKeyAsText(t *testing.T) {
	srv := newService(t, discordCheck)
	h, _ := newHandler(t, notify.Config{DiscordWebhookURL: srv.URL + discordPath}, nil)
	if err := handle(t, h, injectedLinkFailure(t)); err != nil {
		t.Fatal(err)
	}
	// Every character Discord's markdown reads is escaped, "://" is broken
	// so no autolink forms, and mentions stay off.
	const esc = `x/\\[Re\\-download the fixed image\\]\\(https\\://evil.example/x\\).vhdx`
	want := `{"username":"imagepipe","embeds":[{
		"title":"Failed to convert ` + esc + `",
		"description":"uploads/` + esc + ` failed in inspect\\: \"` + esc + `\" is not a disk image",
		"color":14687834,"timestamp":"2026-11-23T07:45:27Z",
		"fields":[
			{"name":"Image","value":"uploads/` + esc + `","inline":true},
			{"name":"Input","value":"unknown","inline":true},
			{"name":"Phase","value":"inspect","inline":true},
			{"name":"Attempt","value":"1","inline":true},
			{"name":"Duration","value":"unknown","inline":true},
			{"name":"Rule","value":"not\\-an\\-image","inline":true},
			{"name":"Job","value":"j\\-1","inline":true},
			{"name":"Error","value":"\"` + esc + `\" is not a disk image"},
			{"name":"Suggestion","value":"upload a \\*real\\* image"}],
		"footer":{"text":"imagepipe · event ev-link"}}],
		"allowed_mentions":{"parse":[]}}`
	got := string(srv.requests()[0].body)
	if canonicalJSON(t, got) != canonicalJSON(t, want) {
		t.Errorf("discord payload:\n%s\nwant:\n%s", canonicalJSON(t, got), canonicalJSON(t, want))
	}
	if strings.Contains(got, "](") || strings.Contains(got, "https://") {
		t.Errorf("payload holds a raw masked link or URL: %s", got)
	}
}

func TestDiscordEscapesEveryMarkdownCharacter(t *testing.T) {
	cases := map[string]string{
		"**bold** __u__ ~~s~~ ||spoiler||": `\*\*bold\*\* \_\_u\_\_ \~\~s\~\~ \|\|spoiler\|\|`,
		"`code` ```block```":               "\\`code\\` \\`\\`\\`block\\`\\`\\`",
		"> quote\n# heading\n- item":       "\\> quote\n\\# heading\n\\- item",
		"<https://a.example> <t:0:R> <@1>": `\<https\://a.example\> \<t\:0\:R\> \<\@1\>`,
		`C:\path\`:                         `C\:\\path\\`,
		"@everyone":                        `\@everyone`,
		"plain/key.vhdx":                   "plain/key.vhdx",
	}
	for in, want := range cases {
		srv := newService(t, discordCheck)
		h, _ := newHandler(t, notify.Config{DiscordWebhookURL: srv.URL + discordPath}, nil)
		ev := mustEvent(t, "ev-md", events.TypeFailed, "k", events.Failed{
			JobID: "j", InputBucket: "uploads", InputKey: "k", Phase: events.PhaseInspect, Message: in,
		})
		if err := handle(t, h, ev); err != nil {
			t.Fatal(err)
		}
		for _, f := range decodeDiscord(t, srv.requests()[0].body).Embeds[0].Fields {
			if f.Name == "Error" && f.Value != want {
				t.Errorf("%q escaped to %q, want %q", in, f.Value, want)
			}
		}
	}
}

func TestDiscordCutNeverLeavesAnEscapeWithoutItsCharacter(t *testing.T) {
	// Every character doubles when escaped, so cuts fall on both sides of
	// a backslash as the lengths vary.
	for n := 250; n < 262; n++ {
		srv := newService(t, discordCheck)
		h, _ := newHandler(t, notify.Config{DiscordWebhookURL: srv.URL + discordPath}, nil)
		key := strings.Repeat("a", n%2) + strings.Repeat("[", n)
		ev := mustEvent(t, "ev-cut", events.TypeFailed, key, events.Failed{
			JobID: "j", InputBucket: "uploads", InputKey: key, Phase: events.PhaseInspect, Message: strings.Repeat("(", 3000),
		})
		if err := handle(t, h, ev); err != nil {
			t.Fatal(err)
		}
		e := decodeDiscord(t, srv.requests()[0].body).Embeds[0]
		texts := []string{e.Title, e.Description}
		for _, f := range e.Fields {
			texts = append(texts, f.Value)
		}
		for _, s := range texts {
			body, cut := strings.CutSuffix(s, "…")
			if !cut {
				continue
			}
			if trailing := len(body) - len(strings.TrimRight(body, `\`)); trailing%2 == 1 {
				t.Errorf("cut text ends in a lone backslash: …%q", body[max(0, len(body)-10):])
			}
			if utf8.RuneCountInString(s) > 4096 {
				t.Errorf("text of %d characters", utf8.RuneCountInString(s))
			}
		}
	}
}

func TestSlackKeepsAnInjectedLinkAndMentionAsText(t *testing.T) {
	srv := newService(t, slackWebhookCheck)
	h, _ := newHandler(t, notify.Config{SlackWebhookURL: srv.URL + slackWebhookPath}, nil)
	key := "x/" + injectedLink + "<!channel><https://evil.example|click>.vhdx"
	ev := mustEvent(t, "ev-slack", events.TypeFailed, key, events.Failed{
		JobID: "j-1", InputBucket: "uploads", InputKey: key, Phase: events.PhaseInspect, Message: "not a disk image", Attempt: 1,
	})
	if err := handle(t, h, ev); err != nil {
		t.Fatal(err)
	}
	// mrkdwn has no [text](url) links; "<" is escaped, so no <url|text>
	// link or <!channel> mention can form; verbatim stops Slack from
	// linking the bare URL. The header is plain_text, never parsed.
	const esc = `x/[Re-download the fixed image](https://evil.example/x)&lt;!channel&gt;&lt;https://evil.example|click&gt;.vhdx`
	const summary = `:x: uploads/` + esc + ` failed in inspect: not a disk image`
	want := `{"text":"` + summary + `",
		"attachments":[{"color":"danger","fallback":"` + summary + `","blocks":[
			{"type":"section","fields":[
				{"type":"mrkdwn","text":"*Image*\nuploads/` + esc + `","verbatim":true},
				{"type":"mrkdwn","text":"*Input*\nunknown","verbatim":true},
				{"type":"mrkdwn","text":"*Phase*\ninspect","verbatim":true},
				{"type":"mrkdwn","text":"*Attempt*\n1","verbatim":true},
				{"type":"mrkdwn","text":"*Duration*\nunknown","verbatim":true},
				{"type":"mrkdwn","text":"*Job*\nj-1","verbatim":true}]},
			{"type":"section","text":{"type":"mrkdwn","text":"*Error*\nnot a disk image","verbatim":true}},
			{"type":"context","elements":[{"type":"mrkdwn","text":"imagepipe · event ev-slack","verbatim":true}]}]}],
		"blocks":[{"type":"header","text":{"type":"plain_text","text":"Failed to convert ` + strings.ReplaceAll(key, `"`, `\"`) + `","emoji":true}}],
		"replace_original":false,"delete_original":false}`
	if got := canonicalJSON(t, string(srv.requests()[0].body)); got != canonicalJSON(t, want) {
		t.Errorf("slack payload:\n%s\nwant:\n%s", got, canonicalJSON(t, want))
	}
}
