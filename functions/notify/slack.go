package notify

import (
	"context"
	"errors"
	"net/http"
	"strings"

	"github.com/slack-go/slack"
)

// Slack Block Kit limits, from Slack's block reference.
const (
	slackHeaderMax    = 150
	slackSectionMax   = 3000
	slackFieldMax     = 2000
	slackFieldsMax    = 10
	slackContextMax   = 2000
	slackFallbackMax  = 3000
	slackColorSuccess = "good"
	slackColorFailure = "danger"
	slackColorWarning = "warning"
)

// slackWebhook posts to a Slack incoming webhook.
type slackWebhook struct{ hookTarget }

func (s *slackWebhook) Name() string { return "slack-webhook" }

func (s *slackWebhook) Send(ctx context.Context, m Message) error {
	text, blocks, att := slackContent(m)
	msg := &slack.WebhookMessage{
		Text:        text,
		Blocks:      &slack.Blocks{BlockSet: blocks},
		Attachments: []slack.Attachment{att},
	}
	ctx, rec := withAnswerRecorder(ctx)
	err := slack.PostWebhookCustomHTTPContext(ctx, s.url, s.client, msg)
	return slackFailure(s.Name(), err, rec, s.r)
}

// slackAPI posts with a bot token through chat.postMessage.
type slackAPI struct {
	api     *slack.Client
	channel string
	r       *redactor
}

func newSlackAPI(token, channel, apiURL string, client *http.Client, r *redactor) *slackAPI {
	if apiURL == "" {
		apiURL = DefaultSlackAPIURL
	}
	if !strings.HasSuffix(apiURL, "/") {
		apiURL += "/"
	}
	return &slackAPI{
		api:     slack.New(token, slack.OptionAPIURL(apiURL), slack.OptionHTTPClient(client)),
		channel: channel,
		r:       r,
	}
}

func (s *slackAPI) Name() string { return "slack-api" }

func (s *slackAPI) Send(ctx context.Context, m Message) error {
	text, blocks, att := slackContent(m)
	ctx, rec := withAnswerRecorder(ctx)
	_, _, err := s.api.PostMessageContext(ctx, s.channel,
		slack.MsgOptionText(text, false),
		slack.MsgOptionBlocks(blocks...),
		slack.MsgOptionAttachments(att),
		slack.MsgOptionDisableLinkUnfurl(),
	)
	return slackFailure(s.Name(), err, rec, s.r)
}

// slackFailure maps slack-go's errors onto DeliveryError.
func slackFailure(channel string, err error, rec *answerRecorder, r *redactor) error {
	if err == nil {
		return nil
	}
	answer, _ := rec.get()
	var (
		rate   *slack.RateLimitedError
		status slack.StatusCodeError
		api    slack.SlackErrorResponse
	)
	switch {
	case errors.As(err, &rate):
		return &DeliveryError{Channel: channel, Status: http.StatusTooManyRequests, RetryAfter: rate.RetryAfter,
			Answer: r.answerText(answer), reason: "rate limited"}
	case errors.As(err, &status):
		e := &DeliveryError{Channel: channel, Status: status.Code, Permanent: !retryableStatus(status.Code),
			Answer: r.answerText(answer), reason: "rejected"}
		if !e.Permanent {
			e.reason = "unavailable"
		}
		return e
	case errors.As(err, &api):
		// chat.postMessage answers 200 with ok=false; its error codes
		// (channel_not_found, invalid_auth, not_in_channel, ...) name a
		// configuration problem, except the few that are the service's own.
		permanent := true
		switch api.Err {
		case "internal_error", "fatal_error", "service_unavailable", "request_timeout", "ratelimited":
			permanent = false
		}
		return &DeliveryError{Channel: channel, Status: http.StatusOK, Permanent: permanent,
			Answer: r.answerText([]byte(api.Err)), reason: "refused"}
	}
	return transportFailure(channel, err, r)
}

// slackContent lays a message out for Slack: the summary as the text Slack
// shows in notifications, a header block, and an attachment whose colour bar
// carries the outcome and whose blocks carry the facts. Every mrkdwn object
// is verbatim: Slack then turns no bare URL, #channel or @name in a key or
// an error message into a link or a mention, and slackEscape leaves no way
// to write one by hand.
func slackContent(m Message) (string, []slack.Block, slack.Attachment) {
	text := slackText(slackEmoji(m.Outcome)+" "+m.Summary, slackFallbackMax)
	header := slack.NewHeaderBlock(slack.NewTextBlockObject(slack.PlainTextType, truncateRunes(m.Title, slackHeaderMax), true, false))

	var fields []*slack.TextBlockObject
	for _, f := range m.Facts {
		if len(fields) == slackFieldsMax {
			break
		}
		fields = append(fields, slack.NewTextBlockObject(slack.MarkdownType,
			slackLabelled(f, slackFieldMax), false, true))
	}
	detail := []slack.Block{slack.NewSectionBlock(nil, fields, nil)}
	for _, n := range m.Notes {
		detail = append(detail, slack.NewSectionBlock(slack.NewTextBlockObject(slack.MarkdownType,
			slackLabelled(n, slackSectionMax), false, true), nil, nil))
	}
	detail = append(detail, slack.NewContextBlock("", slack.NewTextBlockObject(slack.MarkdownType,
		slackText("imagepipe · event "+m.EventID, slackContextMax), false, true)))

	att := slack.Attachment{
		Color:    slackColor(m.Outcome),
		Fallback: text,
		Blocks:   slack.Blocks{BlockSet: detail},
	}
	return text, []slack.Block{header}, att
}

func slackColor(o Outcome) string {
	switch o {
	case OutcomeConverted, OutcomeRecovered:
		return slackColorSuccess
	case OutcomeFailed:
		return slackColorFailure
	}
	return slackColorWarning
}

func slackEmoji(o Outcome) string {
	switch o {
	case OutcomeConverted:
		return ":white_check_mark:"
	case OutcomeFailed:
		return ":x:"
	case OutcomeRecovered:
		return ":arrow_forward:"
	}
	return ":warning:"
}

// slackEscape escapes the three characters Slack's mrkdwn treats as control
// characters, so an object key such as "<!channel>.vhdx" cannot ping a
// whole channel or forge a link.
func slackEscape(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;").Replace(s)
}

// slackText escapes s and fits it in n characters without leaving half an
// entity ("&am…") at the cut.
func slackText(s string, n int) string {
	t := truncateRunes(slackEscape(s), n)
	body, cut := strings.CutSuffix(t, "…")
	if !cut {
		return t
	}
	if i := strings.LastIndexByte(body, '&'); i >= 0 && !strings.Contains(body[i:], ";") {
		body = body[:i]
	}
	return body + "…"
}

// slackLabelled renders a fact as a bold label over its value.
func slackLabelled(f Fact, n int) string {
	return slackText("*"+f.Name+"*\n"+f.Value, n)
}
