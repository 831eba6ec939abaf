package faultproxy

import (
	"bufio"
	"errors"
	"io"
	"net"
	"strings"
	"syscall"
	"testing"
	"time"
)

// lineServer answers every line with "ok <line>" and records what it got.
func lineServer(t *testing.T) (addr string, got chan string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	got = make(chan string, 100)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.WriteString(c, "hello\r\n")
				var all strings.Builder
				r := bufio.NewReader(c)
				for {
					line, err := r.ReadString('\n')
					all.WriteString(line)
					if err != nil {
						got <- all.String()
						return
					}
					io.WriteString(c, "ok "+line)
				}
			}()
		}
	}()
	return ln.Addr().String(), got
}

func dial(t *testing.T, addr string) (net.Conn, *bufio.Reader) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return c, bufio.NewReader(c)
}

func TestPassesTrafficWithoutRules(t *testing.T) {
	addr, got := lineServer(t)
	p := New(t, addr)
	c, r := dial(t, p.Addr)
	if l, _ := r.ReadString('\n'); l != "hello\r\n" {
		t.Fatalf("greeting %q", l)
	}
	io.WriteString(c, "one\r\n")
	if l, _ := r.ReadString('\n'); l != "ok one\r\n" {
		t.Fatalf("reply %q", l)
	}
	c.Close()
	if s := <-got; s != "one\r\n" {
		t.Fatalf("server got %q", s)
	}
}

func TestMatchAcrossReadsResetsAfterNBytes(t *testing.T) {
	addr, got := lineServer(t)
	p := New(t, addr, Rule{When: "DATA\r\n", Then: ResetAfter(3)})
	c, r := dial(t, p.Addr)
	r.ReadString('\n')
	io.WriteString(c, "DA")
	time.Sleep(50 * time.Millisecond) // a separate read
	io.WriteString(c, "TA\r\nabcdef\r\n")
	_, err := io.ReadAll(r)
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read: %v", err)
	}
	if s := <-got; s != "DATA\r\nabc" {
		t.Fatalf("server got %q, want the trigger and 3 bytes", s)
	}
	if f := p.Fired(); len(f) != 1 {
		t.Fatalf("fired %v", f)
	}
}

func TestStallWithholdsTheTriggerAndTheReplies(t *testing.T) {
	addr, got := lineServer(t)
	p := New(t, addr, Rule{When: "\r\n.\r\n", Then: Stall()})
	c, r := dial(t, p.Addr)
	r.ReadString('\n')
	io.WriteString(c, "line\r\n.\r\n")
	c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if _, err := r.ReadString('\n'); err == nil {
		t.Fatal("a reply came through a stalled connection")
	}
	c.Close()
	if s := <-got; s != "line" {
		t.Fatalf("server got %q, want everything before the trigger", s)
	}
}

func TestReplyReplacesTheCommandAndCloses(t *testing.T) {
	addr, got := lineServer(t)
	p := New(t, addr, Rule{When: "RCPT", Then: Reply("421 bye\r\n"), Conn: 1})
	c, r := dial(t, p.Addr)
	r.ReadString('\n')
	io.WriteString(c, "MAIL\r\n")
	r.ReadString('\n')
	io.WriteString(c, "RCPT TO\r\n")
	rest, _ := io.ReadAll(r)
	if string(rest) != "421 bye\r\n" {
		t.Fatalf("client got %q", rest)
	}
	if s := <-got; s != "MAIL\r\n" {
		t.Fatalf("server got %q", s)
	}
	// The second connection has no rule.
	c2, r2 := dial(t, p.Addr)
	r2.ReadString('\n')
	io.WriteString(c2, "RCPT TO\r\n")
	if l, _ := r2.ReadString('\n'); l != "ok RCPT TO\r\n" {
		t.Fatalf("second connection: %q", l)
	}
}

func TestDelayServerHoldsTheGreeting(t *testing.T) {
	addr, _ := lineServer(t)
	p := New(t, addr, Rule{When: "", Then: DelayServer(time.Hour)})
	c, r := dial(t, p.Addr)
	c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if _, err := r.ReadString('\n'); err == nil {
		t.Fatal("greeting not delayed")
	}
	c.Close()
	p.Close() // returns although the delay is an hour: the client left
}
