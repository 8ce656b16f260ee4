package stack

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Proc is one imagepipe function running as a child process. It can be
// killed and started again any number of times; each start appends to the
// same log file.
type Proc struct {
	Name    string
	bin     string
	args    []string
	env     []string
	logPath string

	mu      sync.Mutex
	cmd     *exec.Cmd
	done    chan struct{}
	starts  int
	started time.Time
}

// NewProc is a process of bin with args and exactly the environment env,
// its output appended to logPath; Start starts it. A test that runs a
// replica beside a stack of its own making (one not started by Start)
// uses it to kill that replica as a crash would.
func NewProc(name, bin string, args, env []string, logPath string) *Proc {
	return newProc(name, bin, args, env, logPath)
}

func newProc(name, bin string, args, env []string, logPath string) *Proc {
	return &Proc{Name: name, bin: bin, args: args, env: env, logPath: logPath}
}

// Start launches the process. It is an error to start a running one.
func (p *Proc) Start() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd != nil {
		select {
		case <-p.done:
		default:
			return fmt.Errorf("%s is already running (pid %d)", p.Name, p.cmd.Process.Pid)
		}
	}
	logf, err := os.OpenFile(p.logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return err
	}
	p.starts++
	fmt.Fprintf(logf, "=== start %d of %s at %s\n", p.starts, p.Name, time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(p.bin, p.args...)
	cmd.Env = p.env
	cmd.Stdout, cmd.Stderr = logf, logf
	// A test that dies must not leave replicas behind; an orderly kill of
	// the process itself is what the faults are made of.
	cmd.SysProcAttr = dieWithParent()
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start %s: %w", p.Name, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(done)
	}()
	p.cmd, p.done, p.started = cmd, done, time.Now()
	return nil
}

// StartedAt is when the process was last started.
func (p *Proc) StartedAt() time.Time {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.started
}

// SetEnv changes a variable for the next start.
func (p *Proc) SetEnv(key, value string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.env = slices.DeleteFunc(p.env, func(kv string) bool { return strings.HasPrefix(kv, key+"=") })
	p.env = append(p.env, key+"="+value)
}

// Pid is the running process's id, 0 when none runs.
func (p *Proc) Pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.cmd == nil || p.exited() {
		return 0
	}
	return p.cmd.Process.Pid
}

func (p *Proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Kill sends SIGKILL, as a crash or the OOM killer would, and waits for
// the process to be gone. Its children are left alone, as they would be.
func (p *Proc) Kill() {
	p.signal(syscall.SIGKILL, 0)
}

// Stop asks the process to drain with SIGTERM and kills it if it has not
// exited within grace.
func (p *Proc) Stop(grace time.Duration) {
	p.signal(syscall.SIGTERM, grace)
}

func (p *Proc) signal(sig syscall.Signal, grace time.Duration) {
	p.mu.Lock()
	cmd, done := p.cmd, p.done
	p.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(sig)
	if sig == syscall.SIGKILL {
		<-done
		return
	}
	select {
	case <-done:
	case <-time.After(grace):
		_ = cmd.Process.Signal(syscall.SIGKILL)
		<-done
	}
}

// DumpStacks makes the process print every goroutine's stack to its log
// and exit (SIGQUIT), to show what a stuck job is waiting for.
func (p *Proc) DumpStacks() {
	p.signal(syscall.SIGQUIT, 10*time.Second)
}

// Restart kills the process and starts it again after down.
func (p *Proc) Restart(down time.Duration) error {
	p.Kill()
	time.Sleep(down)
	return p.Start()
}

// PeakRSS is the process's peak resident set size (VmHWM), in bytes.
func (p *Proc) PeakRSS() (int64, error) {
	pid := p.Pid()
	if pid == 0 {
		return 0, errors.New(p.Name + " is not running")
	}
	return procStatusBytes(pid, "VmHWM:")
}

// RSS is the process's resident set size now (VmRSS), in bytes.
func (p *Proc) RSS() (int64, error) {
	pid := p.Pid()
	if pid == 0 {
		return 0, errors.New(p.Name + " is not running")
	}
	return procStatusBytes(pid, "VmRSS:")
}

// LogPath is where the process's output goes.
func (p *Proc) LogPath() string { return p.logPath }

func procStatusBytes(pid int, field string) (int64, error) {
	f, err := os.Open(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), field)
		if !ok {
			continue
		}
		kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
		if err != nil {
			return 0, fmt.Errorf("parse %s %q: %w", field, rest, err)
		}
		return kb << 10, nil
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("no %s in /proc/%d/status", field, pid)
}

// ProcessesUsing lists the processes whose command line mentions dir: a
// qemu-img left running by a replica that was killed holds its job's
// scratch path in its arguments.
func ProcessesUsing(dir string) []Process {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	self := os.Getpid()
	var out []Process
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(b) == 0 {
			continue
		}
		cmdline := strings.ReplaceAll(strings.TrimRight(string(b), "\x00"), "\x00", " ")
		if strings.Contains(cmdline, dir+string(filepath.Separator)) {
			out = append(out, Process{PID: pid, Cmdline: cmdline})
		}
	}
	return out
}

// Process is one entry of ProcessesUsing.
type Process struct {
	PID     int
	Cmdline string
}
