package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/url"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/control"
)

const importLong = `Streams an http(s) URL into the input bucket (default key: imports/<file
name>); the normal flow converts it. Follow it with imagepipe status
BUCKET/KEY --wait. Only public addresses on the ports and hosts the ingest
function allows are fetched (see IMAGEPIPE_IMPORT_* in the README). An
ingest replica fetches it; this command returns as soon as the transfer
has started and prints where the object will appear.`

// importOptions are import's flags.
type importOptions struct {
	sha256  string
	replace bool
	timeout time.Duration
}

func newImportCmd(e *cliEnv) *cobra.Command {
	var o importOptions
	c := &cobra.Command{
		Use:     "import URL [BUCKET/KEY]",
		Short:   "fetch a URL into the input bucket (--sha256 HEX)",
		Long:    importLong,
		Example: "  imagepipe import https://cloud-images.example.org/noble.qcow2\n  imagepipe import https://example.org/disk.qcow2 uploads/vm/disk.qcow2 --sha256 9f86d08...",
		Args:    argsBetween(1, 2, "a URL and optionally BUCKET/KEY"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runImport(cmd.Context(), o, args, e.stdout)
		},
	}
	f := c.Flags()
	f.StringVar(&o.sha256, "sha256", "", "expected hex SHA-256 of the file; on a mismatch nothing is stored")
	f.BoolVar(&o.replace, "replace", false, "overwrite the object at BUCKET/KEY if it exists (refused by rule import-exists otherwise)")
	f.DurationVar(&o.timeout, "timeout", 2*time.Minute, "how long to wait for the source to answer")
	return c
}

// checkImportURL refuses what is no URL at all before anything is asked;
// which schemes, hosts and ports may be fetched is ingest's rule.
func checkImportURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil || u.Scheme == "" || (u.Host == "" && u.Opaque != "") || (u.Host == "" && u.Path == "") {
		return usageError{fmt.Sprintf("import: URL %q is not a URL; want an http or https URL such as https://example.com/disk.qcow2", raw)}
	}
	return nil
}

// runImport asks an ingest replica to fetch a URL into the input bucket.
func runImport(ctx context.Context, o importOptions, args []string, stdout io.Writer) error {
	if err := checkImportURL(args[0]); err != nil {
		return err
	}
	if err := checkTimeout("import", o.timeout); err != nil {
		return err
	}
	if sum := strings.TrimSpace(o.sha256); sum != "" {
		if b, err := hex.DecodeString(sum); err != nil || len(b) != sha256.Size {
			return usageError{fmt.Sprintf("import: --sha256 %q is not a SHA-256 digest; want 64 hex digits, as sha256sum prints", o.sha256)}
		}
	}
	req := events.ImportRequest{URL: args[0], SHA256: o.sha256, Replace: o.replace}
	if len(args) == 2 {
		var err error
		if req.Bucket, req.Key, err = splitObject(args[1]); err != nil {
			return err
		}
	}
	reply, err := askIngest(ctx, o.timeout, (*control.Client).Import, req)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s/%s\n", reply.Bucket, reply.Key)
	return nil
}
