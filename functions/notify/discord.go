package notify

import (
	"context"
	"encoding/json"
	"strings"
	"time"
	"unicode/utf8"
)

// Discord embed limits, from Discord's "Embed Limits" table. Discord counts
// characters, not bytes.
const (
	discordTitleMax       = 256
	discordDescriptionMax = 4096
	discordFieldsMax      = 25
	discordFieldNameMax   = 256
	discordFieldValueMax  = 1024
	discordFooterMax      = 2048
	discordEmbedTotalMax  = 6000
)

// Embed colours: Slack's good/danger/warning, so both chats look alike.
const (
	discordColorSuccess = 0x2EB67D
	discordColorFailure = 0xE01E5A
	discordColorWarning = 0xECB22E
)

type discordPayload struct {
	Username        string                 `json:"username,omitempty"`
	Content         string                 `json:"content,omitempty"`
	Embeds          []discordEmbed         `json:"embeds"`
	AllowedMentions discordAllowedMentions `json:"allowed_mentions"`
}

// discordAllowedMentions with an empty parse list disables every mention,
// so an object key like "@everyone.vhdx" stays text.
type discordAllowedMentions struct {
	Parse []string `json:"parse"`
}

type discordEmbed struct {
	Title       string         `json:"title,omitempty"`
	Description string         `json:"description,omitempty"`
	Color       int            `json:"color"`
	Timestamp   string         `json:"timestamp,omitempty"`
	Fields      []discordField `json:"fields,omitempty"`
	Footer      *discordFooter `json:"footer,omitempty"`
}

type discordField struct {
	Name   string `json:"name"`
	Value  string `json:"value"`
	Inline bool   `json:"inline,omitempty"`
}

type discordFooter struct {
	Text string `json:"text"`
}

// discordWebhook posts an embed to a Discord webhook.
type discordWebhook struct{ hookTarget }

func (d *discordWebhook) Name() string { return "discord" }

func (d *discordWebhook) Send(ctx context.Context, m Message) error {
	body, err := json.Marshal(discordPayload{
		Username:        "imagepipe",
		Embeds:          []discordEmbed{discordContent(m)},
		AllowedMentions: discordAllowedMentions{Parse: []string{}},
	})
	if err != nil {
		return &DeliveryError{Channel: d.Name(), Permanent: true, reason: "encode embed: " + err.Error()}
	}
	return postJSON(ctx, d.client, d.Name(), d.url, "application/json", body, nil, d.r)
}

// discordContent builds the embed and fits it within Discord's limits, which
// otherwise reject the whole message with a 400.
func discordContent(m Message) discordEmbed {
	e := discordEmbed{
		Title:       discordText(m.Title, discordTitleMax),
		Description: discordText(m.Summary, discordDescriptionMax),
		Color:       discordColor(m.Outcome),
		Footer:      &discordFooter{Text: truncateRunes("imagepipe · event "+m.EventID, discordFooterMax)},
	}
	if !m.Time.IsZero() {
		e.Timestamp = m.Time.UTC().Format(time.RFC3339)
	}
	for _, f := range m.Facts {
		e.Fields = append(e.Fields, discordFieldOf(f, true))
	}
	for _, n := range m.Notes {
		e.Fields = append(e.Fields, discordFieldOf(n, false))
	}
	if len(e.Fields) > discordFieldsMax {
		e.Fields = e.Fields[:discordFieldsMax]
	}
	fitDiscordTotal(&e)
	return e
}

// discordFieldOf makes a field Discord accepts: neither name nor value may
// be empty or blank.
func discordFieldOf(f Fact, inline bool) discordField {
	name, value := strings.TrimSpace(f.Name), strings.TrimSpace(f.Value)
	if name == "" {
		name = "\u200b"
	}
	if value == "" {
		value = "-"
	}
	return discordField{
		Name:   truncateRunes(name, discordFieldNameMax),
		Value:  discordText(value, discordFieldValueMax),
		Inline: inline,
	}
}

func discordEmbedChars(e discordEmbed) int {
	n := utf8.RuneCountInString(e.Title) + utf8.RuneCountInString(e.Description)
	if e.Footer != nil {
		n += utf8.RuneCountInString(e.Footer.Text)
	}
	for _, f := range e.Fields {
		n += utf8.RuneCountInString(f.Name) + utf8.RuneCountInString(f.Value)
	}
	return n
}

// fitDiscordTotal enforces the 6000-character budget of an embed: the
// description gives way first, then the longest field values, so the short
// facts (which image, which phase) survive.
func fitDiscordTotal(e *discordEmbed) {
	over := discordEmbedChars(*e) - discordEmbedTotalMax
	if over <= 0 {
		return
	}
	if d := utf8.RuneCountInString(e.Description); d > 1 {
		keep := max(d-over, 1)
		e.Description = truncateEscaped(e.Description, keep)
		over = discordEmbedChars(*e) - discordEmbedTotalMax
	}
	for over > 0 {
		longest, size := -1, 1
		for i, f := range e.Fields {
			if n := utf8.RuneCountInString(f.Value); n > size {
				longest, size = i, n
			}
		}
		if longest < 0 {
			break
		}
		e.Fields[longest].Value = truncateEscaped(e.Fields[longest].Value, max(size-over, size/2, 1))
		over = discordEmbedChars(*e) - discordEmbedTotalMax
	}
	for over > 0 && len(e.Fields) > 0 {
		e.Fields = e.Fields[:len(e.Fields)-1]
		over = discordEmbedChars(*e) - discordEmbedTotalMax
	}
}

func discordColor(o Outcome) int {
	switch o {
	case OutcomeConverted, OutcomeRecovered:
		return discordColorSuccess
	case OutcomeFailed:
		return discordColorFailure
	}
	return discordColorWarning
}

// discordEscaper puts a backslash before every character Discord's
// markdown gives a meaning to, so text derived from an object key or an
// error message renders as the characters it holds: no masked link
// ("[Re-download](https://...)"), no heading, list, quote, spoiler or code,
// no custom emoji or timestamp ("<t:...>"). Escaping ":" also stops Discord
// turning "https://..." into a link, since its link rule needs the "://"
// unbroken; "@" keeps a mention from even looking like one (allowed_mentions
// already stops it from pinging).
var discordEscaper = strings.NewReplacer(
	`\`, `\\`, "*", `\*`, "_", `\_`, "~", `\~`, "`", "\\`", "|", `\|`,
	">", `\>`, "<", `\<`, "#", `\#`, "-", `\-`, "[", `\[`, "]", `\]`,
	"(", `\(`, ")", `\)`, ":", `\:`, "@", `\@`,
)

// discordText escapes s for Discord's markdown and fits it in n characters.
func discordText(s string, n int) string {
	return truncateEscaped(discordEscaper.Replace(s), n)
}

// truncateEscaped fits escaped text in n characters without leaving a
// backslash whose character was cut off, which would escape the ellipsis.
func truncateEscaped(s string, n int) string {
	t := truncateRunes(s, n)
	if t == s {
		return t
	}
	body := strings.TrimSuffix(t, "…")
	if trailing := len(body) - len(strings.TrimRight(body, `\`)); trailing%2 == 1 {
		body = body[:len(body)-1]
	}
	return body + "…"
}
