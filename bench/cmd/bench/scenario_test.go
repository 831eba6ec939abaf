//go:build linux

package main

import (
	"slices"
	"testing"
)

func TestRunOrderKeepsTheStsrelayVariantsBackToBack(t *testing.T) {
	systems := []string{sysStsrelay, sysStsrelayEmpty, sysPostfixReuse}
	want := [][]string{
		{sysStsrelay, sysStsrelayEmpty, sysPostfixReuse},
		{sysPostfixReuse, sysStsrelayEmpty, sysStsrelay},
		{sysStsrelay, sysStsrelayEmpty, sysPostfixReuse},
		{sysPostfixReuse, sysStsrelayEmpty, sysStsrelay},
	}
	for rep, w := range want {
		if got := runOrder(systems, rep); !slices.Equal(got, w) {
			t.Errorf("repetition %d: %v, want %v", rep, got, w)
		}
	}
}

func TestRunOrderTakesTurns(t *testing.T) {
	// The main scenario with a baseline: the block of three variants and
	// the two Postfixes rotate, and so do the variants within the block.
	systems := []string{sysStsrelay, sysStsrelayBaseline, sysStsrelayNoPolicy, sysPostfix, sysPostfixReuse}
	startsRun, leadsBlock := map[string]int{}, map[string]int{}
	for rep := range 3 {
		got := runOrder(systems, rep)
		if len(got) != len(systems) {
			t.Fatalf("repetition %d: %v, want every system once", rep, got)
		}
		for _, sys := range systems {
			if !slices.Contains(got, sys) {
				t.Fatalf("repetition %d: %v lacks %s", rep, got, sys)
			}
		}
		// The variants are adjacent.
		i := slices.IndexFunc(got, isStsrelay)
		for _, sys := range got[i : i+3] {
			if !isStsrelay(sys) {
				t.Fatalf("repetition %d: %v splits the stsrelay variants", rep, got)
			}
		}
		startsRun[got[0]]++
		leadsBlock[got[i]]++
	}
	// Each unit starts one repetition, and each variant leads the block
	// once.
	for _, sys := range []string{sysStsrelay, sysStsrelayBaseline, sysStsrelayNoPolicy} {
		if leadsBlock[sys] != 1 {
			t.Errorf("%s led the block %d times in 3, want once", sys, leadsBlock[sys])
		}
	}
	if startsRun[sysPostfix] != 1 || startsRun[sysPostfixReuse] != 1 {
		t.Errorf("every unit should start one repetition: %v", startsRun)
	}
}

func TestRunOrderWithoutStsrelayRotates(t *testing.T) {
	systems := []string{sysPostfix, sysPostfixReuse}
	if got := runOrder(systems, 1); !slices.Equal(got, []string{sysPostfixReuse, sysPostfix}) {
		t.Errorf("got %v", got)
	}
}
