package proc

import (
	"os"
	"os/exec"
	"slices"
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
	if byName := CPUByName(cmd.Process.Pid); len(byName) != 1 {
		t.Fatalf("CPUByName(sleep) = %v", byName)
	} else if _, ok := byName["sleep"]; !ok {
		t.Fatalf("CPUByName(sleep) = %v, want the key sleep", byName)
	}
}

func TestCPUKeepsTheTimeOfReapedChildren(t *testing.T) {
	before := CPU(os.Getpid())
	// A child that burns CPU and exits: once reaped, its time is in our
	// cstime/cutime, so the tree's total must not drop.
	burn := exec.Command("sh", "-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done")
	if err := burn.Run(); err != nil {
		t.Fatal(err)
	}
	after := CPU(os.Getpid())
	if after <= before {
		t.Fatalf("CPU went from %v to %v after a child burned CPU and was reaped", before, after)
	}
}
