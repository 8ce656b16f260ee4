package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

// argCase is an argument list a command refuses, and what the refusal says.
type argCase struct {
	args []string
	msg  string
}

// commandRow is what one command must do besides answer --help and -h and
// refuse a flag it does not have.
type commandRow struct {
	// args are valid arguments. late is a flag given after them, with a
	// bad value, which only a parser that reads flags anywhere reports as
	// a bad flag value; a command with no flag of its own takes --help.
	args []string
	late []string
	// wrong are argument lists the command refuses with exit 2: its
	// required argument missing, one too many, an unknown subcommand.
	wrong []argCase
}

// refusesExtra is the wrong-arguments case of a command that takes none.
func refusesExtra(name string) []argCase {
	return []argCase{{[]string{"extra"}, name + ` takes no arguments, got ["extra"]`}}
}

// commandRows holds a row for every command in the tree, the root ("")
// and cobra's help and completion included: the test fails on a command
// without a row, so a new command cannot go untested.
var commandRows = map[string]commandRow{
	"": {late: []string{"--help"}, wrong: []argCase{{[]string{"frobnicate"}, `unknown command "frobnicate" for "imagepipe" (see imagepipe --help)`}}},

	"dev":         {late: []string{"--nats-port", "many"}, wrong: refusesExtra("dev")},
	"setup":       {late: []string{"--help"}, wrong: refusesExtra("setup")},
	"ingest":      {late: []string{"--help"}, wrong: refusesExtra("ingest")},
	"convert":     {late: []string{"--help"}, wrong: refusesExtra("convert")},
	"notify":      {late: []string{"--help"}, wrong: refusesExtra("notify")},
	"healthcheck": {late: []string{"--timeout", "soon"}, wrong: refusesExtra("healthcheck")},
	"config": {late: []string{"--help"}, wrong: []argCase{
		{nil, "config needs a subcommand: check"},
		{[]string{"extra"}, `config: unknown subcommand "extra"; want check`},
	}},
	"config check": {args: []string{"convert"}, late: []string{"--help"}, wrong: []argCase{
		{[]string{"convert", "notify"}, "config check takes an optional FUNCTION, got 2 arguments"},
		{[]string{"nosuch"}, `unknown function "nosuch": want ingest, convert, notify or all`},
	}},

	"upload": {args: []string{"disk.vhdx", "uploads/"}, late: []string{"--timeout", "soon"}, wrong: []argCase{
		{nil, "upload takes FILE and an optional BUCKET/KEY, got 0 arguments"},
		{[]string{"disk.vhdx", "uploads/", "extra"}, "upload takes FILE and an optional BUCKET/KEY, got 3 arguments"},
	}},
	"status": {args: []string{"uploads/x.vhdx"}, late: []string{"--timeout", "soon"}, wrong: []argCase{
		{nil, "status takes one BUCKET/KEY (or --job ID), got 0 arguments"},
		{[]string{"uploads/x.vhdx", "uploads/y.vhdx"}, "status takes one BUCKET/KEY (or --job ID), got 2 arguments"},
	}},
	"watch": {args: []string{"uploads/"}, late: []string{"--json=maybe"}, wrong: []argCase{
		{[]string{"uploads/", "extra"}, "watch takes at most one PREFIX, got 2 arguments"},
	}},
	"ls": {late: []string{"--limit", "many"}, wrong: refusesExtra("ls")},
	"inspect": {args: []string{"disk.vhdx"}, late: []string{"--json=maybe"}, wrong: []argCase{
		{nil, "inspect takes one FILE, got 0 arguments"},
		{[]string{"disk.vhdx", "extra"}, "inspect takes one FILE, got 2 arguments"},
	}},
	"import": {args: []string{"https://example.com/d.qcow2"}, late: []string{"--timeout", "soon"}, wrong: []argCase{
		{nil, "import takes a URL and optionally BUCKET/KEY, got 0 arguments"},
		{[]string{"https://example.com/d.qcow2", "uploads/d.qcow2", "extra"}, "import takes a URL and optionally BUCKET/KEY, got 3 arguments"},
	}},

	"ctl": {late: []string{"--timeout", "soon"}, wrong: []argCase{
		{nil, "ctl needs a verb: status, stats, pause, resume, drain, stop, cancel"},
		{[]string{"frobnicate"}, `ctl: unknown verb "frobnicate"; want one of status, stats, pause, resume, drain, stop, cancel`},
	}},
	"ctl status": {late: []string{"--timeout", "soon"}, wrong: refusesExtra("ctl status")},
	"ctl stats":  {late: []string{"--timeout", "soon"}, wrong: refusesExtra("ctl stats")},
	"ctl pause":  {late: []string{"--timeout", "soon"}, wrong: refusesExtra("ctl pause")},
	"ctl resume": {late: []string{"--timeout", "soon"}, wrong: refusesExtra("ctl resume")},
	"ctl drain":  {late: []string{"--timeout", "soon"}, wrong: refusesExtra("ctl drain")},
	"ctl stop":   {late: []string{"--timeout", "soon"}, wrong: refusesExtra("ctl stop")},
	"ctl cancel": {args: []string{"uploads/x.vhdx"}, late: []string{"--timeout", "soon"}, wrong: []argCase{
		{nil, "ctl cancel takes one BUCKET/KEY, got 0 arguments"},
		{[]string{"uploads/x.vhdx", "uploads/y.vhdx"}, "ctl cancel takes one BUCKET/KEY, got 2 arguments"},
	}},
	"reconvert": {args: []string{"uploads/x.vhdx"}, late: []string{"--timeout", "soon"}, wrong: []argCase{
		{nil, "reconvert takes one BUCKET/KEY, got 0 arguments"},
		{[]string{"uploads/x.vhdx", "uploads/y.vhdx"}, "reconvert takes one BUCKET/KEY, got 2 arguments"},
	}},
	"reconcile": {late: []string{"--timeout", "soon"}, wrong: refusesExtra("reconcile")},
	"dedup": {late: []string{"--help"}, wrong: []argCase{
		{nil, "dedup needs a subcommand: prune"},
		{[]string{"frobnicate"}, `dedup: unknown subcommand "frobnicate"; want prune`},
	}},
	"dedup prune": {late: []string{"--older-than", "soon"}, wrong: refusesExtra("dedup prune")},

	"version": {late: []string{"--json=maybe"}, wrong: refusesExtra("version")},
	// A help topic that is no command is a usage error like any other
	// unknown command.
	"help": {args: []string{"status"}, late: []string{"--help"}, wrong: []argCase{
		{[]string{"frobnicate"}, `"frobnicate"`},
	}},
	"completion": {late: []string{"--help"}, wrong: []argCase{
		{nil, "completion needs a subcommand: bash, fish, powershell, zsh"},
		{[]string{"tcsh"}, `completion: unknown subcommand "tcsh"; want bash, fish, powershell, zsh`},
	}},
	"completion bash": {late: []string{"--no-descriptions=maybe"}, wrong: []argCase{
		{[]string{"extra"}, `unknown command "extra" for "imagepipe completion bash"`},
	}},
	"completion fish": {late: []string{"--no-descriptions=maybe"}, wrong: []argCase{
		{[]string{"extra"}, `unknown command "extra" for "imagepipe completion fish"`},
	}},
	"completion powershell": {late: []string{"--no-descriptions=maybe"}, wrong: []argCase{
		{[]string{"extra"}, `unknown command "extra" for "imagepipe completion powershell"`},
	}},
	"completion zsh": {late: []string{"--no-descriptions=maybe"}, wrong: []argCase{
		{[]string{"extra"}, `unknown command "extra" for "imagepipe completion zsh"`},
	}},
}

// commandTree is every command imagepipe answers to, by its path below
// the root, as execute builds it: cobra adds help and completion only when
// it executes, so they are added here the way it adds them.
func commandTree() map[string]*cobra.Command {
	root := newRootCmd(&cliEnv{stdout: io.Discard, stderr: io.Discard, log: slog.New(slog.DiscardHandler), jobCtx: context.Background()})
	root.InitDefaultHelpCmd()
	root.InitDefaultCompletionCmd()
	tree := map[string]*cobra.Command{}
	var walk func(path string, c *cobra.Command)
	walk = func(path string, c *cobra.Command) {
		tree[path] = c
		for _, sub := range c.Commands() {
			walk(strings.TrimSpace(path+" "+sub.Name()), sub)
		}
	}
	walk("", root)
	return tree
}

// TestCLIEveryCommandAnswersHelpBadFlagsLateFlagsAndMissingArguments runs
// every command in the tree with --help, a flag it does not have, a flag
// after its arguments and arguments it refuses. None of them may connect.
func TestCLIEveryCommandAnswersHelpBadFlagsLateFlagsAndMissingArguments(t *testing.T) {
	o := noServers(t, refusalBound())
	tree := commandTree()
	for name := range commandRows {
		if tree[name] == nil {
			t.Errorf("commandRows has a row for %q, which is no command", name)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(tree)) {
		c := tree[name]
		row, ok := commandRows[name]
		if !ok {
			t.Errorf("imagepipe %s has no row in commandRows: add what its flags after arguments and its wrong arguments give", name)
			continue
		}
		if len(row.late) == 0 || len(row.wrong) == 0 {
			t.Errorf("commandRows[%q] needs a late flag and at least one wrong argument list", name)
			continue
		}
		path := strings.Fields(name)
		with := func(more ...[]string) []string {
			out := append([]string{}, path...)
			for _, m := range more {
				out = append(out, m...)
			}
			return out
		}
		t.Run(c.CommandPath(), func(t *testing.T) {
			usage := "Usage:\n  " + c.CommandPath()
			cliCase{args: with([]string{"--help"}), code: 0, stdout: usage}.check(t, o)
			cliCase{args: with([]string{"-h"}), code: 0, stdout: usage}.check(t, o)

			// The refusal names the command and where to read its flags.
			bad := fmt.Sprintf("unknown flag: --no-such-flag (see %s --help)", c.CommandPath())
			if name != "" {
				bad = name + ": " + bad
			}
			cliCase{args: with(row.args, []string{"--no-such-flag"}), code: 2, stderr: bad}.check(t, o)

			late := cliCase{args: with(row.args, row.late), code: 0, stdout: usage}
			if row.late[0] != "--help" {
				flag, value, ok := strings.Cut(row.late[0], "=")
				if !ok {
					value = row.late[1]
				}
				late = cliCase{args: late.args, code: 2, stderr: fmt.Sprintf("invalid argument %q for %q flag", value, flag)}
			}
			late.check(t, o)

			for _, w := range row.wrong {
				cliCase{args: with(w.args), code: 2, stderr: w.msg}.check(t, o)
			}
		})
	}
}
