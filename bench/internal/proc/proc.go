// Package proc measures a process tree from /proc (Linux): CPU time used,
// system calls and page faults, and peak resident memory, summed over the
// roots and all their descendants, so that Postfix (a master and its
// short-lived children) and stsrelay (one process) are measured alike.
package proc

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// clockTick is USER_HZ, the unit of CPU times in /proc/PID/stat: 100 on
// every Linux architecture.
const clockTick = 10 * time.Millisecond

// stat is what we read of one /proc/PID/stat.
type stat struct {
	pid, ppid int
	comm      string
	cpu       time.Duration // utime + stime + cutime + cstime
	faults    int64         // minflt + cminflt + majflt + cmajflt
}

// readStat parses /proc/PID/stat; the command name may hold spaces and
// parentheses, so fields are counted from the last ')'.
func readStat(pid int) (stat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return stat{}, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return stat{}, fmt.Errorf("proc: /proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state): ppid is field 4, utime..cstime 14..17.
	if len(f) < 15 {
		return stat{}, fmt.Errorf("proc: /proc/%d/stat: %d fields", pid, len(f))
	}
	s := stat{pid: pid}
	if j := bytes.IndexByte(b, '('); j >= 0 && j < i {
		s.comm = string(b[j+1 : i])
	}
	s.ppid, _ = strconv.Atoi(f[1])
	for _, k := range f[7:11] { // fields 10..13
		n, _ := strconv.ParseInt(k, 10, 64)
		s.faults += n
	}
	for _, k := range f[11:15] {
		n, _ := strconv.ParseInt(k, 10, 64)
		s.cpu += time.Duration(n) * clockTick
	}
	return s, nil
}

// Tree returns the roots and every living descendant of them.
func Tree(roots ...int) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return roots
	}
	children := make(map[int][]int)
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		s, err := readStat(pid)
		if err != nil {
			continue
		}
		children[s.ppid] = append(children[s.ppid], pid)
	}
	seen := make(map[int]bool)
	var out []int
	var walk func(int)
	walk = func(p int) {
		if seen[p] {
			return
		}
		seen[p] = true
		out = append(out, p)
		for _, c := range children[p] {
			walk(c)
		}
	}
	for _, r := range roots {
		walk(r)
	}
	return out
}

// Usage is what a tree has used so far. Children that have exited count
// in their parent once reaped (its cutime and cstime, its io and fault
// counts), so every figure only grows.
type Usage struct {
	CPU    time.Duration
	ByName map[string]time.Duration // CPU by command name; exited children under their parent's

	// Reads and Writes count read-like and write-like system calls (read,
	// readv, pread and their write twins, on files and sockets alike:
	// /proc/PID/io's syscr and syscw, those that failed with EAGAIN
	// included); Faults, minor and major page faults. They move far less
	// than CPU time with the machine's speed, which makes them comparable
	// between runs on a noisy machine.
	Reads, Writes, Faults int64
}

// ReadUsage sums Usage over the tree under roots.
func ReadUsage(roots ...int) Usage {
	u := Usage{ByName: make(map[string]time.Duration)}
	for _, pid := range Tree(roots...) {
		s, err := readStat(pid)
		if err != nil {
			continue // gone since the walk
		}
		u.CPU += s.cpu
		u.ByName[s.comm] += s.cpu
		u.Faults += s.faults
		b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/io")
		if err != nil {
			continue
		}
		for line := range strings.Lines(string(b)) {
			key, val, _ := strings.Cut(line, ":")
			n, _ := strconv.ParseInt(strings.TrimSpace(val), 10, 64)
			switch key {
			case "syscr":
				u.Reads += n
			case "syscw":
				u.Writes += n
			}
		}
	}
	return u
}

// Memory is resident memory of a tree at one moment, in bytes.
type Memory struct {
	RSS int64 // summed: pages shared between processes count once per process
	PSS int64 // proportional: a shared page counts 1/n in each of its n users
}

// ReadMemory sums /proc/PID/smaps_rollup over the tree.
func ReadMemory(roots ...int) Memory {
	var m Memory
	for _, pid := range Tree(roots...) {
		f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/smaps_rollup")
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			line := sc.Text()
			var dst *int64
			switch {
			case strings.HasPrefix(line, "Rss:"):
				dst = &m.RSS
			case strings.HasPrefix(line, "Pss:"):
				dst = &m.PSS
			default:
				continue
			}
			if f := strings.Fields(line); len(f) >= 2 {
				kb, _ := strconv.ParseInt(f[1], 10, 64)
				*dst += kb << 10
			}
		}
		f.Close()
	}
	return m
}

// Sampler records the peak memory of a tree until stopped.
type Sampler struct {
	stop chan struct{}
	done chan struct{}
	mu   sync.Mutex
	peak Memory
}

// Sample starts sampling the tree under roots every interval.
func Sample(interval time.Duration, roots ...int) *Sampler {
	s := &Sampler{stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(s.done)
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			s.record(ReadMemory(roots...))
			select {
			case <-s.stop:
				return
			case <-t.C:
			}
		}
	}()
	return s
}

func (s *Sampler) record(m Memory) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.peak.RSS = max(s.peak.RSS, m.RSS)
	s.peak.PSS = max(s.peak.PSS, m.PSS)
}

// Stop ends sampling and returns the peaks (each at its own moment).
func (s *Sampler) Stop() Memory {
	close(s.stop)
	<-s.done
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.peak
}

// HighWater returns a process's own peak RSS (VmHWM), which sampling can
// miss between two samples.
func HighWater(pid int) int64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			f := strings.Fields(rest)
			if len(f) > 0 {
				kb, _ := strconv.ParseInt(f[0], 10, 64)
				return kb << 10
			}
		}
	}
	return 0
}
