package main

import (
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"
)

// buildInfo is what `imagepipe version` reports.
type buildInfo struct {
	Version string `json:"version"`
	// Revision and Time are the VCS commit the binary was built from, when
	// the build recorded it (go build in a checkout does; -buildvcs=false
	// and go run do not).
	Revision string `json:"vcs_revision,omitempty"`
	Time     string `json:"vcs_time,omitempty"`
	Modified bool   `json:"vcs_modified,omitempty"`
	Go       string `json:"go_version"`
	Platform string `json:"platform"`
}

func readBuildInfo() buildInfo {
	b := buildInfo{Version: version, Go: runtime.Version(), Platform: runtime.GOOS + "/" + runtime.GOARCH}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return b
	}
	b.Go = info.GoVersion
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			b.Revision = s.Value
		case "vcs.time":
			b.Time = s.Value
		case "vcs.modified":
			b.Modified = s.Value == "true"
		}
	}
	return b
}

func newVersionCmd(e *cliEnv) *cobra.Command {
	var asJSON bool
	c := &cobra.Command{
		Use:   "version",
		Short: "print the version and build information",
		Long: `Prints imagepipe's version, the commit it was built from and when (if the
build recorded them), and the Go version that built it.`,
		Example: "  imagepipe version\n  imagepipe version --json",
		Args:    noArgs,
		RunE: func(*cobra.Command, []string) error {
			b := readBuildInfo()
			if asJSON {
				return writeJSON(e.stdout, b)
			}
			fmt.Fprintln(e.stdout, "imagepipe", b.Version)
			if b.Revision != "" {
				dirty := ""
				if b.Modified {
					dirty = " (modified)"
				}
				fmt.Fprintf(e.stdout, "  commit   %s%s\n", b.Revision, dirty)
			}
			if b.Time != "" {
				fmt.Fprintf(e.stdout, "  built    %s\n", b.Time)
			}
			fmt.Fprintf(e.stdout, "  go       %s %s\n", b.Go, b.Platform)
			return nil
		},
	}
	c.Flags().BoolVar(&asJSON, "json", false, "print the build information as JSON")
	return c
}
