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
	var t cpuTime
	if b, err := os.ReadFile("/proc/stat"); err == nil {
		line, _, _ := bytes.Cut(b, []byte("\n"))
		// cpu user nice system idle iowait irq softirq steal ...
		f := strings.Fields(string(line))
		for i := 1; i < len(f) && i <= 8; i++ {
			if i == 4 || i == 5 {
				continue // idle, iowait
			}
			n, _ := strconv.ParseInt(f[i], 10, 64)
			t.machine += time.Duration(n) * clockTick
		}
	}
	if pid > 0 {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
			// The command name may hold spaces; the fields after it do not.
			if i := bytes.LastIndexByte(b, ')'); i >= 0 {
				f := strings.Fields(string(b[i+1:]))
				if len(f) > 12 {
					utime, _ := strconv.ParseInt(f[11], 10, 64)
					stime, _ := strconv.ParseInt(f[12], 10, 64)
					t.minio = time.Duration(utime+stime) * clockTick
				}
			}
		}
	}
	return t
}
