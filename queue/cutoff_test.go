package queue

import (
	"context"
	"errors"
	"testing"
	"time"
)

// stallingRemote is a destination that stalls every transfer, as a server
// that stops reading in DATA: an attempt ends only when its context is
// done, deferred as delivery defers an interrupted one, or when the test
// lets it go, delivered. The domains in quick answer at once.
type stallingRemote struct {
	quick   map[string]Status
	stalled chan *stalledAttempt
}

// stalledAttempt is one delivery the remote holds up.
type stalledAttempt struct {
	job  *Job
	ctx  context.Context
	goOn chan struct{}
}

func (s *stallingRemote) Deliver(ctx context.Context, job *Job) []Status {
	if job.Domain == senderDomain { // a DSN
		return all(defer451)(job)
	}
	if st, ok := s.quick[job.Domain]; ok {
		return all(st)(job)
	}
	a := &stalledAttempt{job: job, ctx: ctx, goOn: make(chan struct{})}
	s.stalled <- a
	select {
	case <-ctx.Done():
		mx := "mx." + job.Domain
		return all(Status{Code: 451, Enhanced: "4.4.2", RemoteMTA: mx,
			Text: mx + "[192.0.2.1]: delivery interrupted sending the message (" + context.Cause(ctx).Error() + ")"})(job)
	case <-a.goOn:
		return all(ok250)(job)
	}
}

// stallingQueue is a running queue whose deliveries go to a stallingRemote.
func stallingQueue(t *testing.T, quick map[string]Status, setup func(tq *testQueue)) (*testQueue, *stallingRemote) {
	t.Helper()
	s := &stallingRemote{quick: quick, stalled: make(chan *stalledAttempt, 16)}
	tq := newTestQueue(t, nil, Options{ShutdownGrace: 100 * time.Millisecond})
	tq.Queue.opts.Deliverer = s
	if setup != nil {
		setup(tq)
	}
	tq.run(t)
	return tq, s
}

// next waits for the next stalled delivery.
func (s *stallingRemote) next(t *testing.T) *stalledAttempt {
	t.Helper()
	select {
	case a := <-s.stalled:
		return a
	case <-time.After(10 * time.Second):
		t.Fatal("no delivery started")
		return nil
	}
}

// cause waits for a to be cut off and returns why.
func (a *stalledAttempt) cause(t *testing.T) error {
	t.Helper()
	select {
	case <-a.ctx.Done():
		return context.Cause(a.ctx)
	case <-time.After(10 * time.Second):
		t.Fatalf("the delivery of %s to %s was not cut off", a.job.ID, a.job.Domain)
		return nil
	}
}

// eventually waits for cond, failing after 10 seconds.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited 10s for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

const (
	bouncedText = "bounced by the mail system administrator"
	deletedText = "deleted by the mail system administrator"
	heldText    = "held by the mail system administrator"
)

// cutText is why each command cuts a delivery off.
var cutText = map[string]string{"bounce": bouncedText, "delete": deletedText, "hold": heldText}

// An operator's bounce stops the transfer under way: the remote must not
// take a message whose sender was told it failed. The recipient fails
// with the administrator's status and one DSN; the deferral the cut
// caused counts no attempt.
func TestBounceCutsOffTheDeliveryInFlight(t *testing.T) {
	tq, s := stallingQueue(t, map[string]Status{"example.net": defer451}, nil)
	id := tq.enqueue(t, env("alice@example.com", "bob@example.org", "carol@example.net"))
	a := s.next(t)
	eventually(t, "carol's deferral", func() bool { return tq.stored(t, id).Recipients[1].Attempts == 1 })

	res, err := tq.Select("bounce", Selector{Domain: "example.org"}, false)
	if err != nil || res.Recipients != 1 {
		t.Fatalf("bounce -domain example.org: %+v, %v", res, err)
	}
	if cause := a.cause(t); cause == nil || cause.Error() != bouncedText {
		t.Errorf("the delivery was cut off by %v, want %q", cause, bouncedText)
	}
	tq.settle(t)
	m := tq.stored(t, id)
	if bob := m.Recipients[0]; bob.State != StateFailed || bob.Last.String() != "554 5.0.0 "+bouncedText || bob.Attempts != 0 || bob.NoticeOwed != "" {
		t.Errorf("bob after the bounce: %s %q, %d attempts, notice owed %q; want failed by the administrator, no attempt counted, DSN queued",
			bob.State, bob.Last, bob.Attempts, bob.NoticeOwed)
	}
	if carol := m.Recipients[1]; carol.State != StateDeferred || carol.Attempts != 1 {
		t.Errorf("carol, not bounced: %s, %d attempts; want deferred, 1", carol.State, carol.Attempts)
	}
	dsns := tq.dsnsTo(t, "alice@example.com")
	if len(dsns) != 1 {
		t.Fatalf("%d DSNs, want 1", len(dsns))
	}
	rep := parseDSN(t, tq.body(t, dsns[0]))
	if len(rep.recipients) != 1 || rep.recipients[0].Get("Final-Recipient") != "rfc822; bob@example.org" ||
		rep.recipients[0].Get("Diagnostic-Code") != "X-stsrelay; 554 5.0.0 "+bouncedText {
		t.Errorf("DSN recipients %v, want bob bounced by the administrator", rep.recipients)
	}
}

// A delete stops the transfer under way too (a spam run, say), by id or
// by a selection.
func TestDeleteCutsOffTheDeliveryInFlight(t *testing.T) {
	for _, how := range []string{"id", "selection"} {
		t.Run(how, func(t *testing.T) {
			tq, s := stallingQueue(t, nil, nil)
			id := tq.enqueue(t, env("alice@example.com", "bob@example.org"))
			a := s.next(t)
			if how == "id" {
				if err := tq.Delete(id); err != nil {
					t.Fatal(err)
				}
			} else if res, err := tq.Select("delete", Selector{Sender: "alice@example.com"}, false); err != nil || res.Messages != 1 {
				t.Fatalf("delete -sender: %+v, %v", res, err)
			}
			if cause := a.cause(t); cause == nil || cause.Error() != deletedText {
				t.Errorf("the delivery was cut off by %v, want %q", cause, deletedText)
			}
			tq.settle(t)
			if _, err := tq.Show(id); !errors.Is(err, ErrNotFound) {
				t.Errorf("the deleted message is still queued: %v", err)
			}
			if n := len(tq.dsnsTo(t, "alice@example.com")); n != 0 {
				t.Errorf("delete sent %d DSNs", n)
			}
		})
	}
}

// A hold stops the transfer under way; the recipient stays held, with no
// attempt counted, until a release.
func TestHoldCutsOffTheDeliveryInFlight(t *testing.T) {
	tq, s := stallingQueue(t, nil, nil)
	id := tq.enqueue(t, env("alice@example.com", "bob@example.org"))
	a := s.next(t)
	if n, err := tq.Hold(id); n != 1 || err != nil {
		t.Fatalf("hold: %d, %v", n, err)
	}
	if cause := a.cause(t); cause == nil || cause.Error() != heldText {
		t.Errorf("the delivery was cut off by %v, want %q", cause, heldText)
	}
	tq.settle(t)
	if bob := tq.show(t, id).Recipients[0]; bob.State != StateHeld || bob.Attempts != 0 || bob.NextAttempt != nil {
		t.Errorf("bob after the hold: %s, %d attempts, next attempt %v; want held, no attempt counted, none planned", bob.State, bob.Attempts, bob.NextAttempt)
	}
	if n, err := tq.Release(id); n != 1 || err != nil {
		t.Fatalf("release: %d, %v", n, err)
	}
	b := s.next(t)
	if b.job.Attempt != 1 {
		t.Errorf("the attempt after the release is number %d, want 1", b.job.Attempt)
	}
	close(b.goOn)
	eventually(t, "the delivery after the release", func() bool {
		_, err := tq.Show(id)
		return errors.Is(err, ErrNotFound)
	})
}

// A selection by domain cuts off only that domain's transfer; the same
// message's transfer to another domain goes on.
func TestSelectionCutsOffOnlyTheDomainItPicks(t *testing.T) {
	for _, action := range []string{"bounce", "delete", "hold"} {
		t.Run(action, func(t *testing.T) {
			tq, s := stallingQueue(t, nil, nil)
			id := tq.enqueue(t, env("alice@example.com", "bob@example.org", "carol@example.net"))
			inFlight := map[string]*stalledAttempt{}
			for range 2 {
				a := s.next(t)
				inFlight[a.job.Domain] = a
			}
			org, net := inFlight["example.org"], inFlight["example.net"]
			if org == nil || net == nil {
				t.Fatalf("deliveries in flight: %v", inFlight)
			}
			res, err := tq.Select(action, Selector{Domain: "example.org"}, false)
			if err != nil || res.Recipients != 1 {
				t.Fatalf("%s -domain example.org: %+v, %v", action, res, err)
			}
			if cause := org.cause(t); cause == nil || cause.Error() != cutText[action] {
				t.Errorf("example.org's delivery was cut off by %v, want %q", cause, cutText[action])
			}
			// The command cuts off before it returns.
			if err := net.ctx.Err(); err != nil {
				t.Fatalf("example.net's delivery was cut off too: %v", context.Cause(net.ctx))
			}
			close(net.goOn)
			tq.settle(t)
			if action != "hold" {
				eventually(t, "the message to leave", func() bool {
					_, err := tq.Show(id)
					return errors.Is(err, ErrNotFound)
				})
				return
			}
			m := tq.show(t, id)
			if bob, carol := m.Recipients[0], m.Recipients[1]; bob.State != StateHeld || bob.Attempts != 0 || carol.State != StateDelivered {
				t.Errorf("bob %s after %d attempts, carol %s; want bob held with none counted, carol delivered", bob.State, bob.Attempts, carol.State)
			}
		})
	}
}

// Retry and release take no recipient away: a transfer under way goes on.
func TestRetryAndReleaseCutNothingOff(t *testing.T) {
	var id string
	tq, s := stallingQueue(t, nil, func(tq *testQueue) {
		id = tq.enqueue(t, env("alice@example.com", "bob@example.org", "carol@example.net"))
		if _, err := tq.Select("hold", Selector{Domain: "example.net"}, false); err != nil {
			t.Fatal(err)
		}
	})
	a := s.next(t)
	if n, err := tq.Retry(id); n != 1 || err != nil {
		t.Fatalf("retry: %d, %v", n, err)
	}
	if res, err := tq.Select("retry", Selector{All: true}, false); err != nil || res.Recipients != 1 {
		t.Fatalf("retry -all: %+v, %v", res, err)
	}
	if n, err := tq.Release(id); n != 1 || err != nil {
		t.Fatalf("release: %d, %v", n, err)
	}
	b := s.next(t) // carol, released
	if err := a.ctx.Err(); err != nil {
		t.Fatalf("retry or release cut off the delivery in flight: %v", context.Cause(a.ctx))
	}
	close(a.goOn)
	close(b.goOn)
	eventually(t, "both deliveries", func() bool {
		_, err := tq.Show(id)
		return errors.Is(err, ErrNotFound)
	})
}
