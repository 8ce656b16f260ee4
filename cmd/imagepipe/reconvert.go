package main

import (
	"context"
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/control"
)

const reconvertLong = `Queues a new conversion of an uploaded object, even if the same content
was converted before, and prints the job id. An ingest replica does the
work, so the request follows the running ingest's rules and input bucket,
and needs no S3 credentials; follow the job with imagepipe status --wait.`

func newReconvertCmd(e *cliEnv) *cobra.Command {
	var (
		format  string
		timeout time.Duration
	)
	c := &cobra.Command{
		Use:     "reconvert BUCKET/KEY",
		Short:   "queue a new conversion of an upload (--format qcow2)",
		Long:    reconvertLong,
		Example: "  imagepipe reconvert uploads/disks/win11.vhdx\n  imagepipe reconvert uploads/disks/win11.vhdx --format qcow2",
		Args:    argsBetween(1, 1, "one BUCKET/KEY"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runReconvert(cmd.Context(), args[0], format, timeout, e.stdout)
		},
	}
	c.Flags().StringVar(&format, "format", "", "output format, raw or qcow2 (default: the converter's IMAGEPIPE_OUTPUT_FORMAT)")
	c.Flags().DurationVar(&timeout, "timeout", 30*time.Second, "how long to wait for an answer")
	return c
}

// checkFormat refuses an output format convert cannot write, naming flag.
func checkFormat(cmd, format string) error {
	if format != "" && format != "raw" && format != "qcow2" {
		return usageError{fmt.Sprintf("%s: --format %q is not raw or qcow2", cmd, format)}
	}
	return nil
}

// runReconvert asks an ingest replica to queue a new conversion of an
// object.
func runReconvert(ctx context.Context, object, format string, timeout time.Duration, stdout io.Writer) error {
	if err := checkFormat("reconvert", format); err != nil {
		return err
	}
	if err := checkTimeout("reconvert", timeout); err != nil {
		return err
	}
	bucket, key, err := splitObject(object)
	if err != nil {
		return err
	}
	reply, err := askIngest(ctx, timeout, (*control.Client).Reconvert, events.ReconvertRequest{Bucket: bucket, Key: key, Format: format})
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, reply.JobID)
	return nil
}

// askIngest connects to NATS and sends req to an ingest replica with
// request, one of control.Client's ingest requests, waiting up to timeout
// for the answer.
func askIngest[Req, Rep any](ctx context.Context, timeout time.Duration, request func(*control.Client, context.Context, Req) (Rep, error), req Req) (Rep, error) {
	nc, _, err := connectCLI(ctx)
	if err != nil {
		var none Rep
		return none, err
	}
	defer nc.Close()
	return request(control.NewClient(nc, timeout), ctx, req)
}

// checkTimeout refuses a timeout that would end a request before it is
// sent.
func checkTimeout(cmd string, d time.Duration) error {
	if d <= 0 {
		return usageError{fmt.Sprintf("%s: --timeout %s is not positive; want a duration such as 30s", cmd, d)}
	}
	return nil
}
