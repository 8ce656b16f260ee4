package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"strings"

	"github.com/spf13/cobra"

	"github.com/imagepipe/imagepipe/events"
	"github.com/imagepipe/imagepipe/internal/config"
)

const rootLong = `imagepipe converts VM disk images uploaded to S3 into raw or qcow2 images.

One binary holds the functions (ingest, convert, notify), the all-in-one
dev stack and the tools operators use. Flags go before or after arguments,
every command answers --help, and functions are configured by IMAGEPIPE_*
environment variables (see README.md).

Exit codes: 0 success, 1 failure, 2 usage error (unknown command, bad flag
or flag value, wrong number of arguments).`

// cliEnv is what every command shares besides the drain context, which
// cobra hands each command as cmd.Context().
type cliEnv struct {
	stdout, stderr io.Writer
	log            *slog.Logger
	// jobCtx is cancelled by the second signal: abort running jobs.
	jobCtx context.Context
	// ran is set once a command's own code starts; any error before that
	// is cobra refusing the command line, a usage error.
	ran bool
}

// usageError is a command line that cannot be run as given: exit code 2.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

// errSilent fails a command whose output already said why (a refused
// image's verdict): exit 1 with nothing more on stderr.
var errSilent = errors.New("failed")

// errNoCommand is a bare `imagepipe`: the help goes to stderr, exit 2.
var errNoCommand = errors.New("no command")

// execute parses args, runs the command they name and returns the exit
// code: 0 success, 1 failure, 2 usage. Errors are printed once, on stderr.
func execute(ctx context.Context, e *cliEnv, args []string) int {
	root := newRootCmd(e)
	root.SetArgs(args)
	err := root.ExecuteContext(ctx)
	switch {
	case err == nil:
		return 0
	case errors.Is(err, errSilent):
		return 1
	case errors.Is(err, errNoCommand):
		fmt.Fprint(e.stderr, root.UsageString())
		return 2
	}
	if problems := new(*config.Problems); errors.As(err, problems) {
		// A list of configuration problems reads best one to a line.
		fmt.Fprintln(e.stderr, "imagepipe:", err)
		return 1
	}
	fmt.Fprintln(e.stderr, "imagepipe:", oneLineError(err))
	if !e.ran || errors.As(err, new(usageError)) {
		return 2
	}
	return 1
}

// oneLineError keeps an error on one line: cobra suggests commands for a
// mistyped one on lines of their own.
func oneLineError(err error) string {
	msg := strings.TrimSpace(err.Error())
	if before, after, ok := strings.Cut(msg, "\n\nDid you mean this?\n"); ok {
		msg = before + "; did you mean " + strings.Join(strings.Fields(after), " or ") + "?"
	}
	if strings.HasPrefix(msg, "unknown command ") {
		msg += " (see imagepipe --help)"
	}
	return strings.Join(strings.Fields(msg), " ")
}

// newRootCmd builds the command tree, one constructor per command file.
func newRootCmd(e *cliEnv) *cobra.Command {
	root := &cobra.Command{
		Use:           "imagepipe",
		Short:         "convert VM disk images uploaded to S3 into raw or qcow2 images",
		Long:          rootLong,
		Version:       version,
		SilenceErrors: true,
		SilenceUsage:  true,
		RunE: func(*cobra.Command, []string) error {
			return errNoCommand
		},
	}
	root.SetOut(e.stdout)
	root.SetErr(e.stderr)
	root.SetVersionTemplate("imagepipe {{.Version}}\n")
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		if !c.HasParent() {
			return usageError{fmt.Sprintf("%v (see %s --help)", err, c.CommandPath())}
		}
		return usageError{fmt.Sprintf("%s: %v (see %s --help)", cmdName(c), err, c.CommandPath())}
	})
	root.AddGroup(
		&cobra.Group{ID: "run", Title: "Run imagepipe:"},
		&cobra.Group{ID: "use", Title: "Convert and follow images:"},
		&cobra.Group{ID: "operate", Title: "Operate the running functions:"},
	)
	root.SetHelpCommandGroupID("")
	add := func(group string, cmds ...*cobra.Command) {
		for _, c := range cmds {
			c.GroupID = group
			root.AddCommand(c)
		}
	}
	add("run",
		newDevCmd(e), newSetupCmd(e),
		newFunctionCmd(e, events.FunctionIngest, "run the ingest function: filter, validate and de-duplicate uploads, queue jobs",
			"Runs the ingest function: it reads MinIO's notifications, filters and validates\nthe uploads, de-duplicates them and queues conversion jobs."),
		newFunctionCmd(e, events.FunctionConvert, "run the convert function: download, inspect, convert and upload images",
			"Runs the convert function: it downloads each queued upload to scratch,\ninspects it, converts it with qemu-img, uploads the output and publishes the result."),
		newFunctionCmd(e, events.FunctionNotify, "run the notify function: Slack, Discord, webhook and email notifications",
			"Runs the notify function: it sends results and alerts to Slack, Discord,\na webhook and email, as IMAGEPIPE_NOTIFY_ON asks."),
		newHealthcheckCmd(e), newConfigCmd(e),
	)
	add("use",
		newUploadCmd(e), newStatusCmd(e), newWatchCmd(e), newLsCmd(e), newInspectCmd(e), newImportCmd(e),
	)
	add("operate",
		newCtlCmd(e), newReconvertCmd(e), newReconcileCmd(e), newDedupCmd(e),
	)
	root.AddCommand(newVersionCmd(e))
	// cobra adds help and completion itself when it runs; made here, a
	// missing or unknown topic or shell is a usage error as everywhere else
	// instead of help printed with exit 0.
	root.InitDefaultHelpCmd()
	root.InitDefaultCompletionCmd()
	for _, c := range root.Commands() {
		switch c.Name() {
		case "help":
			c.Run, c.RunE = nil, helpTopic
		case "completion":
			needsSubcommand(c)
		}
	}
	markRan(root, e)
	return root
}

// markRan wraps every command's RunE so that execute can tell cobra's
// refusals (before RunE) from the command's own failures.
func markRan(c *cobra.Command, e *cliEnv) {
	if run := c.RunE; run != nil {
		c.RunE = func(cmd *cobra.Command, args []string) error {
			e.ran = true
			return run(cmd, args)
		}
	}
	for _, sub := range c.Commands() {
		markRan(sub, e)
	}
}

// newFunctionCmd runs one function as a long-lived service, configured by
// the environment only.
func newFunctionCmd(e *cliEnv, name, short, long string) *cobra.Command {
	return &cobra.Command{
		Use:   name,
		Short: short,
		Long: long + `

It is a long-running service configured by IMAGEPIPE_* environment variables
(see README.md). The first SIGINT or SIGTERM drains: it stops fetching and
finishes the jobs in flight; a second one aborts them, and JetStream hands
them to another replica.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := requireLinux(name); err != nil {
				return err
			}
			return runFunction(cmd.Context(), e.jobCtx, name, e.log)
		},
	}
}

// newConfigCmd holds the configuration tools; `config check` validates
// what a function would run with, without connecting anywhere.
func newConfigCmd(e *cliEnv) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "config",
		Short: "check the IMAGEPIPE_* configuration",
	}
	cmd.AddCommand(&cobra.Command{
		Use:   "check [ingest|convert|notify|all]",
		Short: "print the effective configuration with secrets masked; exit 1 on any problem",
		Long: `Prints every IMAGEPIPE_* variable the named function reads (all of them by
default), its value with secrets masked, and whether it was set or defaulted.
Every problem is listed, and the exit code is 1 if there is any. Nothing is
contacted: run it before starting a function, or in a container's entrypoint.`,
		Args: argsBetween(0, 1, "an optional FUNCTION"),
		RunE: func(_ *cobra.Command, args []string) error {
			function := ""
			if len(args) == 1 {
				function = args[0]
			}
			return runConfigCheck(e.stdout, function)
		},
	})
	needsSubcommand(cmd)
	return cmd
}

// needsSubcommand makes c, which only groups its subcommands, refuse a
// missing or unknown one as a usage error: cobra would print c's help
// and exit 0, and a script would take the typo for success.
func needsSubcommand(c *cobra.Command) {
	var names []string
	for _, sub := range c.Commands() {
		if sub.IsAvailableCommand() {
			names = append(names, sub.Name())
		}
	}
	want := strings.Join(names, ", ")
	c.Args = cobra.ArbitraryArgs
	c.RunE = func(_ *cobra.Command, args []string) error {
		if len(args) == 0 {
			return usageError{fmt.Sprintf("%s needs a subcommand: %s (see %s --help)", cmdName(c), want, c.CommandPath())}
		}
		return usageError{fmt.Sprintf("%s: unknown subcommand %q; want %s", cmdName(c), args[0], want)}
	}
}

// helpTopic is `imagepipe help [COMMAND]`: a command that does not exist
// is a usage error, not a line of text followed by exit 0.
func helpTopic(c *cobra.Command, args []string) error {
	cmd, _, err := c.Root().Find(args)
	if cmd == nil || err != nil {
		return usageError{fmt.Sprintf("help: no command %q (see %s --help)", strings.Join(args, " "), c.Root().Name())}
	}
	cmd.InitDefaultHelpFlag()
	cmd.InitDefaultVersionFlag()
	return cmd.Help()
}

// noArgs refuses any argument.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) != 0 {
		return usageError{fmt.Sprintf("%s takes no arguments, got %q (see %s --help)", cmdName(cmd), args, cmd.CommandPath())}
	}
	return nil
}

// argsBetween accepts between min and max arguments, described by what.
func argsBetween(min, max int, what string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) < min || len(args) > max {
			return usageError{fmt.Sprintf("%s takes %s, got %d argument%s (see %s --help)",
				cmdName(cmd), what, len(args), plural(len(args)), cmd.CommandPath())}
		}
		return nil
	}
}

// cmdName is the command's path below the root, as "ctl cancel".
func cmdName(c *cobra.Command) string {
	if !c.HasParent() {
		return c.Name()
	}
	return strings.TrimPrefix(c.CommandPath(), c.Root().Name()+" ")
}

func plural(n int) string {
	if n == 1 {
		return ""
	}
	return "s"
}
