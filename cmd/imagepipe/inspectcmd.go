package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/imagepipe/imagepipe/functions/convert"
	"github.com/imagepipe/imagepipe/internal/decompress"
	"github.com/imagepipe/imagepipe/internal/failure"
	"github.com/imagepipe/imagepipe/internal/inspect"
	"github.com/imagepipe/imagepipe/internal/qemuimg"
)

const inspectLong = `Inspects a disk image on this machine, with no service running, and says
what the convert function would decide about it: the format its header
shows, its virtual size, its size, and whether the safety rules accept it,
with the reasons. It runs the same inspector as convert, then qemu-img
info (from qemu-utils) the way convert runs it, and checks its report.

The virtual size limit is IMAGEPIPE_MAX_VIRTUAL_SIZE, as for convert.
A gzip, xz or zstd file is decompressed first, as convert decompresses an
upload: into a temporary directory under IMAGEPIPE_SCRATCH_DIR, refused
once it expands past IMAGEPIPE_MAX_VIRTUAL_SIZE or its data past the free
space beyond IMAGEPIPE_SCRATCH_RESERVE; runs of zeros are written as holes.

Exit codes: 0 convert would accept the image, 1 it would refuse it (or the
file cannot be read), 2 usage error.
`

// inspection is what `imagepipe inspect` reports.
type inspection struct {
	File        string   `json:"file"`
	Key         string   `json:"key"`
	Format      string   `json:"format,omitempty"`
	Details     []string `json:"details,omitempty"`
	VirtualSize int64    `json:"virtual_size,omitempty"`
	FileSize    int64    `json:"file_size"`
	ActualSize  int64    `json:"actual_size"`
	Verdict     string   `json:"verdict"` // "accepted" or "refused"
	Rule        string   `json:"rule,omitempty"`
	Reason      string   `json:"reason,omitempty"`
	Suggestion  string   `json:"suggestion,omitempty"`
	// Checks are the checks passed, in the order convert makes them.
	Checks []string `json:"checks"`
	// Compression is the codec the file was compressed with, and
	// ExpandedSize the size of its content; both empty when it was not.
	Compression  string `json:"compression,omitempty"`
	ExpandedSize int64  `json:"expanded_size,omitempty"`
}

const inspectExample = `  imagepipe inspect win11.vhdx
  imagepipe inspect disk.qcow2 --json
  imagepipe inspect disk.qcow2.xz
  imagepipe inspect appliance.ova
  imagepipe inspect --key disks/web.vmdk ./export/web-disk1.vmdk`

func newInspectCmd(e *cliEnv) *cobra.Command {
	var (
		key    string
		asJSON bool
	)
	c := &cobra.Command{
		Use:     "inspect FILE",
		Short:   "judge a local image as convert would (--json)",
		Long:    inspectLong,
		Example: inspectExample,
		Args:    argsBetween(1, 1, "one FILE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runInspect(cmd.Context(), args[0], key, asJSON, e.stdout)
		},
	}
	c.Flags().StringVar(&key, "key", "", "judge the extension by this object key instead of the file's name")
	c.Flags().BoolVar(&asJSON, "json", false, "print the report as JSON")
	return c
}

// runInspect judges a local image as convert would. The verdict is the
// report, on stdout; a refusal is exit code 1 with nothing on stderr.
func runInspect(ctx context.Context, file, key string, asJSON bool, stdout io.Writer) error {
	var s settings
	if err := loadCommandSettings(&s.Convert); err != nil {
		return err
	}
	// qemu-img reads "proto:" and "json:" names as other things than a
	// file; an absolute path is always the file.
	path, err := filepath.Abs(file)
	if err != nil {
		return err
	}
	rep := inspection{File: file, Key: key, Checks: []string{}}
	if rep.Key == "" {
		rep.Key = filepath.Base(path)
	}
	if err := judge(ctx, path, s.Convert, &rep); err != nil {
		return err
	}
	if asJSON {
		if err := writeJSON(stdout, rep); err != nil {
			return err
		}
	} else {
		printInspection(stdout, rep)
	}
	if rep.Verdict != "accepted" {
		return errSilent
	}
	return nil
}

// judge fills in rep with the verdict, in the order convert reaches it:
// the header, the name, then qemu-img's own view. It returns an error only
// when the file cannot be judged at all.
func judge(ctx context.Context, path string, cfg convert.Config, rep *inspection) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("inspect: %w", err)
	}
	st, err := f.Stat()
	if err == nil && !st.Mode().IsRegular() {
		err = fmt.Errorf("%s is not a regular file", path)
	}
	var head [6]byte
	n, _ := io.ReadFull(f, head[:])
	f.Close()
	if err != nil {
		return fmt.Errorf("inspect: %w", err)
	}
	rep.FileSize = st.Size()
	rep.ActualSize = allocatedBytes(st)
	if codec := decompress.Detect(head[:n]); codec != decompress.None {
		return judgeCompressed(ctx, path, codec, cfg, rep)
	}
	return judgeImage(ctx, path, cfg.InspectLimits(), rep)
}

// judgeCompressed expands a compressed file as convert expands an upload,
// with the same limits, and judges what it holds under the key without
// the codec's suffix.
func judgeCompressed(ctx context.Context, path string, codec decompress.Codec, cfg convert.Config, rep *inspection) error {
	dir, err := os.MkdirTemp(cfg.Scratch(), "imagepipe-inspect-")
	if err != nil {
		return fmt.Errorf("inspect: scratch for decompressing: %w", err)
	}
	defer os.RemoveAll(dir)
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("inspect: %w", err)
	}
	defer f.Close()
	expanded := filepath.Join(dir, "input")
	res, err := decompress.Expand(ctx, f, expanded, decompress.Budget{MaxSize: cfg.MaxVirtualSize, Reserve: cfg.ScratchReserve})
	rep.Compression = string(codec)
	if fe, ok := failure.As(err); ok && fe.Permanent && fe.Rule != "" {
		rep.Verdict, rep.Rule, rep.Reason, rep.Suggestion = "refused", fe.Rule, fe.Err.Error(), fe.Suggestion
		return nil
	}
	if err != nil {
		return fmt.Errorf("inspect: decompress %s: %w", rep.File, err)
	}
	rep.ExpandedSize = res.Size
	rep.Checks = append(rep.Checks, fmt.Sprintf("decompress: %s, %s of content (%s written, the rest zeros left as holes), within IMAGEPIPE_MAX_VIRTUAL_SIZE and the scratch space",
		codec, humanize.IBytes(uint64(res.Size)), humanize.IBytes(uint64(res.Allocated))))
	key := rep.Key
	rep.Key = decompress.KeyForExtension(key, codec)
	defer func() { rep.Key = key }()
	return judgeImage(ctx, expanded, cfg.InspectLimits(), rep)
}

// judgeImage judges an image no longer compressed, under rep.Key.
func judgeImage(ctx context.Context, path string, lim inspect.Limits, rep *inspection) error {
	ir, err := inspect.InspectFile(path, lim)
	rep.Format, rep.Details, rep.VirtualSize = string(ir.Format), ir.Details, ir.VirtualSize
	if refused(rep, err) {
		return nil
	}
	if err != nil {
		return err
	}
	rep.Checks = append(rep.Checks, "header: "+describeHeader(ir))
	if refused(rep, inspect.CheckExtension(ir, rep.Key)) {
		return nil
	}
	if named, ok := inspect.FormatFromKey(rep.Key); ok {
		rep.Checks = append(rep.Checks, fmt.Sprintf("name: %s says %s, as the content does", filepath.Ext(rep.Key), named))
	} else {
		rep.Checks = append(rep.Checks, fmt.Sprintf("name: %q names no format, so it cannot disagree", filepath.Ext(rep.Key)))
	}
	if ir.Format == inspect.OVA {
		if err := checkOVAManifest(ctx, path, lim); refused(rep, err) {
			return nil
		} else if err != nil {
			return err
		}
		rep.Checks = append(rep.Checks, "ova: every member a plain file, named safely, once, declared by the descriptor, and matching the manifest",
			"ova: convert inspects each disk of the archive the same way as it extracts it")
		rep.Verdict = "accepted"
		return nil
	}

	vsize, err := convert.Judge(ctx, qemuimg.New(slog.New(slog.DiscardHandler)), ir, path, rep.Key, lim)
	if refused(rep, err) {
		return nil
	}
	if fe, ok := failure.As(err); ok && fe.Permanent {
		// qemu-img itself could not read the file, or gave up on it.
		rep.Verdict, rep.Rule = "refused", fe.Rule
		if rep.Rule == "" {
			rep.Rule = "qemu-img"
		}
		rep.Reason, rep.Suggestion = strings.Join(strings.Fields(fe.Err.Error()), " "), fe.Suggestion
		return nil
	}
	if err != nil {
		return err
	}
	rep.VirtualSize = vsize
	rep.Checks = append(rep.Checks, fmt.Sprintf("qemu-img info: reads it as %s, with no backing file, external data file or outside extent", ir.Format))
	if lim.MaxVirtualSize > 0 {
		rep.Checks = append(rep.Checks, fmt.Sprintf("virtual size: %s, within the limit of %s", humanize.IBytes(uint64(vsize)), humanize.IBytes(uint64(lim.MaxVirtualSize))))
	}
	rep.Verdict = "accepted"
	return nil
}

// checkOVAManifest checks an OVA's members against its manifest, as
// convert does before it extracts anything.
func checkOVAManifest(ctx context.Context, path string, lim inspect.Limits) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return err
	}
	arc, err := inspect.ReadOVA(f, st.Size(), lim)
	if err != nil {
		return err
	}
	return arc.CheckManifest(ctx, f)
}

// refused records a refusal in rep and reports whether err was one.
func refused(rep *inspection, err error) bool {
	var r *inspect.Refusal
	if !errors.As(err, &r) {
		return false
	}
	rep.Verdict, rep.Rule, rep.Reason, rep.Suggestion = "refused", r.Rule, r.Reason, r.Suggestion
	return true
}

func describeHeader(r inspect.Report) string {
	if len(r.Details) == 0 {
		return string(r.Format)
	}
	return strings.Join(r.Details, ", ")
}

func printInspection(w io.Writer, r inspection) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "file\t%s\n", r.File)
	if r.Format != "" {
		fmt.Fprintf(tw, "format\t%s\n", r.Format)
	}
	if r.VirtualSize > 0 {
		fmt.Fprintf(tw, "virtual size\t%s (%d bytes)\n", humanize.IBytes(uint64(r.VirtualSize)), r.VirtualSize)
	}
	fmt.Fprintf(tw, "file size\t%s (%d bytes)\n", humanize.IBytes(uint64(r.FileSize)), r.FileSize)
	if r.Compression != "" {
		fmt.Fprintf(tw, "compression\t%s, expanding to %s (%d bytes)\n", r.Compression, humanize.IBytes(uint64(r.ExpandedSize)), r.ExpandedSize)
	}
	fmt.Fprintf(tw, "actual size\t%s on disk\n", humanize.IBytes(uint64(r.ActualSize)))
	if r.Verdict == "accepted" {
		fmt.Fprintf(tw, "verdict\taccepted: convert would convert this image\n")
	} else {
		fmt.Fprintf(tw, "verdict\trefused by rule %s: %s\n", r.Rule, r.Reason)
		fmt.Fprintf(tw, "suggestion\t%s\n", r.Suggestion)
	}
	for i, c := range r.Checks {
		label := ""
		if i == 0 {
			label = "passed"
		}
		fmt.Fprintf(tw, "%s\t%s\n", label, c)
	}
	_ = tw.Flush()
}
