package proc

import (
	"os"
	"os/exec"
	"slices"
	"syscall"
	"testing"
)

func TestTreeFindsChildrenAndMemoryIsRead(t *testing.T) {
	cmd := exec.Command("sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
	}()
	tree := Tree(os.Getpid())
	if !slices.Contains(tree, os.Getpid()) || !slices.Contains(tree, cmd.Process.Pid) {
		t.Fatalf("Tree(self) = %v, want self and the child %d", tree, cmd.Process.Pid)
	}
	m := ReadMemory(os.Getpid())
	if m.RSS <= 0 || m.PSS <= 0 || m.PSS > m.RSS {
		t.Fatalf("memory = %+v, want 0 < PSS <= RSS", m)
	}
	if hw := HighWater(os.Getpid()); hw <= 0 {
		t.Fatalf("VmHWM = %d", hw)
	}
	if byName := ReadUsage(cmd.Process.Pid).ByName; len(byName) != 1 {
		t.Fatalf("CPU by name of sleep = %v", byName)
	} else if _, ok := byName["sleep"]; !ok {
		t.Fatalf("CPU by name of sleep = %v, want the key sleep", byName)
	}
}

func TestCPUKeepsTheTimeOfReapedChildren(t *testing.T) {
	before := ReadUsage(os.Getpid()).CPU
	// A child that burns CPU and exits: once reaped, its time is in our
	// cstime/cutime, so the tree's total must not drop.
	burn := exec.Command("sh", "-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done")
	if err := burn.Run(); err != nil {
		t.Fatal(err)
	}
	after := ReadUsage(os.Getpid()).CPU
	if after <= before {
		t.Fatalf("CPU went from %v to %v after a child burned CPU and was reaped", before, after)
	}
}

func TestUsageCountsReadsWritesAndFaultsOfReapedChildren(t *testing.T) {
	before := ReadUsage(os.Getpid())
	// dd with one-byte blocks: 2,000 reads and 2,000 writes of its own,
	// in our counts once it is reaped.
	if out, err := exec.Command("dd", "if=/dev/zero", "of=/dev/null", "bs=1", "count=2000").CombinedOutput(); err != nil {
		t.Fatalf("dd: %v: %s", err, out)
	}
	// And faults of our own: 4 MiB mapped afresh, each page touched once
	// (the heap might hand back pages touched before).
	mem, err := syscall.Mmap(-1, 0, 4<<20, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Munmap(mem)
	for i := 0; i < len(mem); i += 4096 {
		mem[i] = 1
	}
	after := ReadUsage(os.Getpid())
	if d := after.Reads - before.Reads; d < 2000 {
		t.Errorf("reads grew by %d, want at least dd's 2,000", d)
	}
	if d := after.Writes - before.Writes; d < 2000 {
		t.Errorf("writes grew by %d, want at least dd's 2,000", d)
	}
	if d := after.Faults - before.Faults; d < 100 {
		t.Errorf("page faults grew by %d after touching 1,024 new pages", d)
	}
}
