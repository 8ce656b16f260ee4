package bench

import (
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// clockTick is the unit of /proc's CPU times (USER_HZ), 100 on every
// Linux architecture Go supports.
const clockTick = 10 * time.Millisecond

// cpuTime is CPU used so far: by the whole machine, and by MinIO.
type cpuTime struct{ machine, minio time.Duration }

func (a cpuTime) sub(b cpuTime) cpuTime {
	return cpuTime{machine: a.machine - b.machine, minio: a.minio - b.minio}
}

// readCPU reads the machine's busy time from /proc/stat and process pid's
// own from /proc/PID/stat. Errors leave a field zero: the figures explain
// the timings, they are not the timings.
func readCPU(pid int) cpuTime {
	own, _ := procCPU(pid)
	return cpuTime{machine: machineCPU(), minio: own}
}

// machineCPU is the time all cores have been busy so far, from /proc/stat.
func machineCPU() time.Duration {
	var t time.Duration
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := bytes.Cut(b, []byte("\n"))
	// cpu user nice system idle iowait irq softirq steal ...
	f := strings.Fields(string(line))
	for i := 1; i < len(f) && i <= 8; i++ {
		if i == 4 || i == 5 {
			continue // idle, iowait
		}
		n, _ := strconv.ParseInt(f[i], 10, 64)
		t += time.Duration(n) * clockTick
	}
	return t
}

// procCPU is the CPU process pid has used so far, from /proc/PID/stat: its
// own, and its children's once it has waited for them (for convert, the
// qemu-img runs it has finished). Zero where it cannot be read.
func procCPU(pid int) (own, children time.Duration) {
	if pid <= 0 {
		return 0, 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0
	}
	// The command name may hold spaces; the fields after it do not. The
	// first of them is the state, field 3 of proc(5).
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 15 {
		return 0, 0
	}
	tick := func(k int) time.Duration {
		n, _ := strconv.ParseInt(f[k], 10, 64)
		return time.Duration(n) * clockTick
	}
	// utime, stime, cutime, cstime: fields 14 to 17.
	return tick(11) + tick(12), tick(13) + tick(14)
}
