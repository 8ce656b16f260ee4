package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/imagepipe/imagepipe/events"
)

// runImport asks an ingest replica to fetch a URL into the input bucket.
// The replica streams it; this command returns as soon as the transfer has
// started and prints where the object will appear.
func runImport(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("import", flag.ContinueOnError)
	sum := fs.String("sha256", "", "expected hex SHA-256 of the file; on a mismatch nothing is stored")
	replace := fs.Bool("replace", false, "overwrite the object at BUCKET/KEY if it exists (refused by rule import-exists otherwise)")
	timeout := fs.Duration("timeout", 2*time.Minute, "how long to wait for the source to answer")
	fs.Usage = func() {
		fmt.Fprintln(fs.Output(), "Usage: imagepipe import [--sha256 HEX] [--replace] URL [BUCKET/KEY]\n\nStreams an http(s) URL into the input bucket (default key: imports/<file name>);\nthe normal flow converts it. Follow it with imagepipe status BUCKET/KEY.\nOnly public addresses on the ports and hosts the ingest function allows are\nfetched (see IMAGEPIPE_IMPORT_* in the README).")
		fs.PrintDefaults()
	}
	if err := parseFlags(fs, interleaved(fs, args), stdout); err != nil {
		return err
	}
	if fs.NArg() < 1 || fs.NArg() > 2 {
		return usageError{"import takes a URL and optionally BUCKET/KEY"}
	}
	req := events.ImportRequest{URL: fs.Arg(0), SHA256: *sum, Replace: *replace}
	if fs.NArg() == 2 {
		var err error
		if req.Bucket, req.Key, err = splitObject(fs.Arg(1)); err != nil {
			return err
		}
	}
	var reply events.ImportReply
	if err := ctlRequest(ctx, events.SubjectImport, req, &reply, *timeout); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s/%s\n", reply.Bucket, reply.Key)
	return nil
}
