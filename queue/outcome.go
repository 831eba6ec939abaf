package queue

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"time"

	"go.etcd.io/bbolt"
)

// Outcomes of one attempt for one recipient, as logs and metrics name them.
const (
	outcomeDelivered = "delivered"
	outcomeDeferred  = "deferred"
	outcomeFailed    = "failed"
	outcomeExpired   = "expired"
)

// backoff returns the wait after a recipient's attempts-th failed attempt:
// the schedule entry (the last one repeats) plus up to 10% jitter, so a
// retry never comes sooner than configured.
func (q *Queue) backoff(attempts int) time.Duration {
	s := q.opts.RetrySchedule
	d := s[min(max(attempts, 1), len(s))-1]
	if j := int64(d / 10); j > 0 {
		d += time.Duration(rand.Int64N(j))
	}
	return d
}

// applyOutcome records the statuses of one delivery, with the DSNs they
// call for marked owed, then queues those DSNs. cut is why a stop or an
// operator's command cut the delivery off (the cause of its context),
// nil when nothing did.
func (q *Queue) applyOutcome(job *Job, idx []int, statuses []Status, cut error) error {
	if len(statuses) != len(idx) {
		q.log.Error("queue: deliverer returned the wrong number of statuses; deferring all", "id", job.ID, "domain", job.Domain, "want", len(idx), "got", len(statuses))
		st := Status{Code: 451, Enhanced: "4.3.0", Text: fmt.Sprintf("internal error: deliverer returned %d statuses for %d recipients", len(statuses), len(idx))}
		statuses = slices.Repeat([]Status{st}, len(idx))
	}
	if cut != nil {
		// A deferral that a stop or an operator's command caused says
		// nothing about the destination: those recipients stay as they
		// were (due at the next start, or at once; held or failed by the
		// command), with no attempt counted, no step of the schedule, no
		// delay notice and no expiry (docs/DESIGN.md, Durability and The
		// queue commands). One cut off after the final dot may get the
		// message twice, as after a crash.
		idx, statuses = settled(idx, statuses)
		if len(idx) == 0 {
			q.log.Debug("recipients left as they were: delivery cut off", "id", job.ID, "domain", job.Domain, "cause", cut)
			return nil
		}
	}
	var (
		m        *message
		outcomes []string
	)
	err := q.commit.do(func(tx *bbolt.Tx) error {
		var err error
		m, err = q.recs.get(tx, job.ID)
		if err != nil || m == nil {
			return err // deleted while in flight: nothing to record
		}
		now := q.opts.Now()
		outcomes = make([]string, len(idx))
		for k, i := range idx {
			if i >= len(m.Recipients) {
				continue
			}
			r := &m.Recipients[i]
			outcomes[k] = q.applyStatus(m, r, statuses[k], now)
			a := noticeFor(r, outcomes[k], statuses[k])
			if outcomes[k] == outcomeDeferred && r.State == StateDeferred && !r.DelayNotified &&
				q.opts.DelayNoticeAfter > 0 && now.Sub(m.Arrived) >= q.opts.DelayNoticeAfter && wantsDelayNotice(r) {
				a = "delayed"
				r.DelayNotified = true // once per recipient
			}
			switch {
			case a != "" && canNotify(m):
				r.NoticeOwed = a // a failure outdates a delay notice still owed
			case r.NoticeOwed == "delayed" && r.State.Final():
				r.NoticeOwed = "" // "still trying" no longer holds
			}
		}
		// The DSNs are written after this commit (sendNotices): a body
		// that cannot be written must not undo the outcome.
		return q.recs.save(tx, m)
	}, func() {
		if m != nil {
			q.indexPut(m)
		}
	})
	if err != nil {
		return err
	}
	if m == nil {
		return nil
	}
	for _, o := range outcomes {
		if o != "" {
			metricDeliveries.WithLabelValues(o).Inc()
		}
	}
	q.logOutcome(job, m, idx, statuses, outcomes)
	if m.owesNotice() {
		q.sendNotices([]string{m.ID})
	}
	return nil
}

// settled returns the recipients (by index into the record) and statuses
// of a delivery that are delivered or permanently failed.
func settled(idx []int, statuses []Status) ([]int, []Status) {
	var keptIdx []int
	var kept []Status
	for k, st := range statuses {
		if st.Delivered() || st.Permanent() {
			keptIdx = append(keptIdx, idx[k])
			kept = append(kept, st)
		}
	}
	return keptIdx, kept
}

// applyStatus moves r according to st and returns the outcome name ("" when
// r had already reached a final state, by an operator's bounce say).
func (q *Queue) applyStatus(m *message, r *recipient, st Status, now time.Time) string {
	if r.State.Final() {
		return ""
	}
	r.Attempts++
	r.LastAttempt = now
	r.Last = st
	resume := r.ResumeAt
	r.ResumeAt = time.Time{}
	if st.RemoteMTA != "" {
		r.LastMX = st.RemoteMTA
	}
	switch {
	case st.Delivered():
		r.State = StateDelivered
		return outcomeDelivered
	case st.Permanent():
		r.State = StateFailed
		return outcomeFailed
	}
	deadline := m.Arrived.Add(q.opts.MaxQueueTime)
	if !now.Before(deadline) {
		// RFC 5321 §4.5.4.1: give up after the configured time.
		r.State = StateFailed
		r.Last = Status{
			Code:     554,
			Enhanced: "5.4.7",
			Text:     fmt.Sprintf("delivery time expired after %s; last error: %s", days(q.opts.MaxQueueTime), st),
		}
		return outcomeExpired
	}
	if r.State == StateHeld {
		return outcomeDeferred // an operator held it meanwhile; release decides
	}
	r.State = StateDeferred
	if resume.After(now) {
		// An operator's retry failed: the schedule goes on as if it had
		// not happened, neither sooner nor one step further.
		r.NextAttempt = resume
		r.Skipped++
	} else {
		r.NextAttempt = now.Add(q.backoff(r.Attempts - r.Skipped))
	}
	// The last retry falls on the deadline, so expiry is not late.
	if r.NextAttempt.After(deadline) {
		r.NextAttempt = deadline
	}
	return outcomeDeferred
}

// noticeFor returns the DSN Action that outcome calls for under r's NOTIFY
// (RFC 3461 §4.1), or "".
func noticeFor(r *recipient, outcome string, st Status) string {
	switch outcome {
	case outcomeFailed, outcomeExpired:
		// No NOTIFY: a failure DSN is still sent (RFC 3461 §4.1).
		if r.Notify == nil || notifies(r.Notify, "FAILURE") {
			return "failed"
		}
	case outcomeDelivered:
		// RFC 3461 §5.2.1: a next hop that got NOTIFY sends the success
		// notice itself; stsrelay never delivers to a mailbox, so it
		// only says "relayed" when NOTIFY could not be passed on (§5.2.2).
		if st.Relayed && notifies(r.Notify, "SUCCESS") {
			return "relayed"
		}
	}
	return ""
}

// notifies reports whether NOTIFY list includes kind.
func notifies(list []string, kind string) bool {
	for _, n := range list {
		if strings.EqualFold(n, kind) {
			return true
		}
	}
	return false
}

// wantsDelayNotice reports whether r may get a delay DSN. Without NOTIFY
// the MTA chooses (RFC 3461 §4.1: FAILURE or FAILURE,DELAY); stsrelay
// sends delay notices then, as sendmail does.
func wantsDelayNotice(r *recipient) bool {
	return r.Notify == nil || notifies(r.Notify, "DELAY")
}

// days formats d as "5d" when it is whole days, else as Go does.
func days(d time.Duration) string {
	if d%(24*time.Hour) == 0 {
		return fmt.Sprintf("%dd", d/(24*time.Hour))
	}
	return d.String()
}

// logOutcome writes one line per outcome and status among the recipients
// of a delivery.
func (q *Queue) logOutcome(job *Job, m *message, idx []int, statuses []Status, outcomes []string) {
	if !slices.Contains(outcomes, outcomeExpired) && !q.log.Enabled(context.Background(), slog.LevelDebug) {
		return // only debug lines to write, and no one to read them
	}
	type group struct {
		outcome, status string
		rcpts           []string
		next            time.Time
	}
	var groups []*group
	for k, i := range idx {
		if outcomes[k] == "" || i >= len(m.Recipients) {
			continue
		}
		r := &m.Recipients[i]
		st := r.Last.String()
		var g *group
		for _, x := range groups {
			if x.outcome == outcomes[k] && x.status == st {
				g = x
			}
		}
		if g == nil {
			g = &group{outcome: outcomes[k], status: st}
			groups = append(groups, g)
		}
		g.rcpts = append(g.rcpts, r.Addr)
		if r.State == StateDeferred {
			g.next = r.NextAttempt
		}
	}
	for _, g := range groups {
		attrs := []any{"id", job.ID, "message_id", job.Envelope.MessageID, "domain", job.Domain,
			"recipients", strings.Join(g.rcpts, ","), "outcome", g.outcome, "status", g.status, "attempt", job.Attempt}
		if !g.next.IsZero() {
			attrs = append(attrs, "next_retry", g.next.UTC().Format(time.RFC3339))
		}
		// delivery logs the attempt itself in one line (MX, policy, TLS,
		// time); this one says what became of the recipients, for debugging.
		// Giving up is news of its own.
		if g.outcome == outcomeExpired {
			q.log.Warn("gave up: delivery time expired", attrs...)
			continue
		}
		q.log.Debug("recipients updated", attrs...)
	}
}
