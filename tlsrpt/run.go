package tlsrpt

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"go.etcd.io/bbolt"
)

// loopInterval bounds how long Run sleeps between looks at its work.
const loopInterval = 10 * time.Minute

// Run makes each closed day's reports after 00:00 UTC plus a random delay
// (RFC 8460 §4.1), delivers them, retries what failed, and forgets old
// data, until ctx is done. It catches up on days missed while stopped.
func (t *Reporter) Run(ctx context.Context) {
	for {
		t.work.Lock()
		next := t.runOnce(ctx)
		t.work.Unlock()
		wait := min(max(next.Sub(t.opts.Now()), time.Second), loopInterval)
		timer := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			timer.Stop()
			return
		case <-timer.C:
		}
		timer.Stop()
	}
}

// runOnce does what is due and returns when to look again.
func (t *Reporter) runOnce(ctx context.Context) time.Time {
	now := t.opts.Now().UTC()
	today := now.Format(dayFormat)
	midnight := startOfDay(now)
	next := midnight.Add(24*time.Hour + t.delay)
	if now.Sub(midnight) < t.delay {
		next = midnight.Add(t.delay) // today's, not tomorrow's
	} else {
		t.Flush()
		var closed []string
		t.opts.DB.View(func(tx *bbolt.Tx) error {
			for _, d := range days(tx) {
				if d < today {
					closed = append(closed, d)
				}
			}
			return nil
		})
		for _, d := range closed {
			if ctx.Err() != nil {
				return now
			}
			if t.madeDays[d] {
				continue
			}
			// Made reports are pending and due now: deliverDue sends them.
			results, _, err := t.makeDay(ctx, d, false)
			if err != nil {
				t.log.Error("tlsrpt: making reports", "day", d, "err", err)
				continue
			}
			// Every domain has its report unless a DNS failure left one
			// to try again; a closed day gets no new results.
			complete := true
			for _, r := range results {
				if r.State == statePending && r.ReportID == "" {
					complete = false
				}
			}
			if complete {
				t.madeDays[d] = true
			}
		}
	}
	if at := t.deliverDue(ctx, now); !at.IsZero() && at.Before(next) {
		next = at
	}
	if err := prune(t.opts.Update, now); err != nil {
		t.log.Warn("tlsrpt: forgetting old results", "err", err)
	}
	return next
}

func latest(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func startOfDay(t time.Time) time.Time {
	y, m, d := t.UTC().Date()
	return time.Date(y, m, d, 0, 0, 0, 0, time.UTC)
}

// SendResult says what became of one domain's report.
type SendResult struct {
	Domain   string    `json:"domain"`
	State    string    `json:"state"` // pending, sent, failed, no-record
	ReportID string    `json:"report_id,omitempty"`
	SentTo   []string  `json:"sent_to,omitempty"`
	Next     time.Time `json:"next_attempt,omitzero"`
	Error    string    `json:"error,omitempty"`
	// Skipped says the report was not sent again: it was already sent,
	// or the domain wants no reports, and force was not given.
	Skipped bool `json:"skipped,omitempty"`
}

// Send makes and delivers the reports of day ("2006-01-02") now, whatever
// the random delay. A report already sent (or a domain known to want
// none) is left alone unless force; a sent report is then sent again
// as it was, report-id and all, so a receiver can tell it is the same.
// The running day is reported only with force: a partial report whose
// date range ends now, which does not replace the full one.
func (t *Reporter) Send(ctx context.Context, day string, force bool) ([]SendResult, error) {
	d, err := time.Parse(dayFormat, day)
	if err != nil {
		return nil, fmt.Errorf("day %q is not YYYY-MM-DD", day)
	}
	now := t.opts.Now().UTC()
	today := startOfDay(now)
	switch {
	case d.After(today):
		return nil, fmt.Errorf("%s has not begun", day)
	case d.Equal(today) && !force:
		return nil, fmt.Errorf("%s is not over yet; use -force for a partial report that ends now", day)
	}
	t.Flush()
	t.work.Lock()
	defer t.work.Unlock()
	if d.Equal(today) {
		return t.makePartial(ctx, day, now)
	}
	results, todo, err := t.makeDay(ctx, day, force)
	if err != nil {
		return nil, err
	}
	results = append(results, t.deliverAll(ctx, todo)...)
	sort.Slice(results, func(i, j int) bool { return results[i].Domain < results[j].Domain })
	return results, nil
}

// makeDay makes the reports of a closed day that have none yet (with
// force: again) and returns, besides what it decided, the reports to
// deliver now: those it made and those still pending.
func (t *Reporter) makeDay(ctx context.Context, day string, force bool) ([]SendResult, []*storedReport, error) {
	start, err := time.Parse(dayFormat, day)
	if err != nil {
		return nil, nil, err
	}
	var byDomain map[string][]*aggregate
	existing := map[string]*storedReport{}
	t.opts.DB.View(func(tx *bbolt.Tx) error {
		byDomain = dayResults(tx, day)
		for dom := range byDomain {
			if r := getReport(tx, (&storedReport{Day: day, Domain: dom}).key()); r != nil {
				existing[dom] = r
			}
		}
		return nil
	})
	var results []SendResult
	var todo []*storedReport
	for _, dom := range sortedKeys(byDomain) {
		rep := existing[dom]
		switch {
		case rep == nil:
			rep = &storedReport{Day: day, Domain: dom, Start: start, End: start.Add(24 * time.Hour)}
			if !t.prepare(ctx, rep, byDomain[dom]) && rep.State == "" {
				// A DNS failure: the next run tries again.
				results = append(results, SendResult{Domain: dom, State: statePending, Error: rep.LastError})
				continue
			}
		case rep.State == statePending:
			// Delivered below, due or not.
		case !force:
			results = append(results, rep.result(true))
			continue
		default:
			// Forced: look up the record again; send the stored report
			// again, or make it if there never was one.
			t.resend(ctx, rep, byDomain[dom])
		}
		if rep.State != statePending {
			results = append(results, rep.result(false))
			continue
		}
		todo = append(todo, rep)
	}
	return results, todo, nil
}

// makePartial sends the running day's results up to now, for every domain.
func (t *Reporter) makePartial(ctx context.Context, day string, now time.Time) ([]SendResult, error) {
	start, _ := time.Parse(dayFormat, day)
	end := now.Truncate(time.Second)
	var byDomain map[string][]*aggregate
	t.opts.DB.View(func(tx *bbolt.Tx) error { byDomain = dayResults(tx, day); return nil })
	var results []SendResult
	var todo []*storedReport
	for _, dom := range sortedKeys(byDomain) {
		rep := &storedReport{Day: day, Domain: dom, Partial: true, Start: start, End: end}
		t.prepare(ctx, rep, byDomain[dom])
		switch rep.State {
		case "":
			results = append(results, SendResult{Domain: dom, State: stateFailed, Error: rep.LastError})
		case stateNoRecord:
			results = append(results, rep.result(false))
		default:
			todo = append(todo, rep)
		}
	}
	return append(results, t.deliverAll(ctx, todo)...), nil
}

// prepare looks up the domain's record and makes the report. It returns
// false when there is nothing to send: State is then no-record (stored),
// or "" after a DNS failure (LastError says which; nothing stored).
func (t *Reporter) prepare(ctx context.Context, rep *storedReport, aggs []*aggregate) bool {
	now := t.opts.Now()
	rec, err := LookupRecord(ctx, t.opts.Resolver, rep.Domain)
	key := string(rep.key())
	if err == nil || isNoRecord(err) {
		delete(t.lookupFailing, key)
	} else if _, ok := t.lookupFailing[key]; !ok && ctx.Err() == nil && !rep.Partial {
		t.lookupFailing[key] = now
	}
	switch {
	case err != nil && ctx.Err() != nil:
		// Cut off (a stop, a control client gone): not the domain's
		// failure, and not a retry spent.
		rep.LastError = err.Error()
		return false
	case isNoRecord(err):
		rep.State, rep.LastError, rep.Created = stateNoRecord, err.Error(), now
		if !errors.Is(err, ErrNoRecord) {
			t.log.Warn("tlsrpt: no report sent: the domain's TLSRPT record is not usable", "domain", rep.Domain, "err", err)
		}
		metricReports.WithLabelValues(stateNoRecord).Inc()
		t.save(rep)
		return false
	case err != nil && !rep.Partial && now.Sub(latest(rep.End, t.lookupFailing[key])) >= retryWindow:
		delete(t.lookupFailing, key)
		rep.State, rep.LastError, rep.Created = stateFailed, "TLSRPT record lookup: "+err.Error(), now
		metricReports.WithLabelValues(stateFailed).Inc()
		t.log.Error("tlsrpt: report given up: the TLSRPT record lookup kept failing", "domain", rep.Domain, "day", rep.Day, "err", err)
		t.save(rep)
		return false
	case err != nil:
		rep.LastError = err.Error()
		t.log.Warn("tlsrpt: TLSRPT record lookup failed; will try again", "domain", rep.Domain, "err", err)
		return false
	}
	rep.RUA = nil
	for _, e := range rec.RUA {
		if e.Err != nil {
			t.log.Warn("tlsrpt: rua not used", "domain", rep.Domain, "rua", e.URI, "err", e.Err)
			continue
		}
		rep.RUA = append(rep.RUA, e.URI)
	}
	rep.UID = newUID()
	rep.ReportID = fmt.Sprintf("%s.%s.%s@%s", strings.ReplaceAll(rep.Day, "-", ""), rep.Domain, rep.UID, t.submitter)
	r := build(Report{
		OrganizationName: t.opts.OrganizationName,
		DateRange:        DateRange{Start: rep.Start.UTC(), End: rep.End.UTC()},
		ContactInfo:      t.opts.ContactInfo,
		ReportID:         rep.ReportID,
	}, aggs)
	rep.Successful, rep.Failed = 0, 0
	for _, p := range r.Policies {
		rep.Successful += p.Summary.Successful
		rep.Failed += p.Summary.Failed
	}
	rep.Created, rep.State, rep.Attempts, rep.Next, rep.LastError = now, statePending, 0, now, ""
	rep.Body, err = compress(r)
	if err == nil && len(rep.RUA) == 0 {
		err = errors.New("no rua URI uses mailto or https")
	}
	if err != nil {
		rep.State, rep.LastError = stateFailed, err.Error()
		metricReports.WithLabelValues(stateFailed).Inc()
		t.log.Error("tlsrpt: report not sent", "domain", rep.Domain, "err", err)
	}
	t.save(rep)
	return rep.State == statePending
}

// resend makes a sent or failed report pending again for -force, with
// the record looked up afresh; one never made is made now.
func (t *Reporter) resend(ctx context.Context, rep *storedReport, aggs []*aggregate) bool {
	if len(rep.Body) == 0 {
		return t.prepare(ctx, rep, aggs)
	}
	rec, err := LookupRecord(ctx, t.opts.Resolver, rep.Domain)
	if err != nil {
		rep.LastError = err.Error()
		if isNoRecord(err) {
			rep.State = stateNoRecord
			t.save(rep)
		}
		return false
	}
	rep.RUA = nil
	for _, e := range rec.Usable() {
		rep.RUA = append(rep.RUA, e.URI)
	}
	now := t.opts.Now()
	rep.State, rep.Created, rep.Attempts, rep.Next, rep.LastError = statePending, now, 0, now, ""
	rep.Sent, rep.SentTo = time.Time{}, nil
	if len(rep.RUA) == 0 {
		// As prepare says it: a record with nowhere to send is no
		// retry for 24 hours.
		rep.State, rep.Next, rep.LastError = stateFailed, time.Time{}, "no rua URI uses mailto or https"
	}
	t.save(rep)
	return rep.State == statePending
}

func (t *Reporter) save(rep *storedReport) {
	if err := putReport(t.opts.Update, rep); err != nil {
		t.log.Error("tlsrpt: cannot store report state", "domain", rep.Domain, "day", rep.Day, "err", err)
	}
}

func (r *storedReport) result(skipped bool) SendResult {
	return SendResult{Domain: r.Domain, State: r.State, ReportID: r.ReportID, SentTo: r.SentTo,
		Next: r.Next, Error: r.LastError, Skipped: skipped}
}

// deliverDue delivers the pending reports whose time has come and returns
// the earliest next attempt of those still pending (zero: none).
func (t *Reporter) deliverDue(ctx context.Context, now time.Time) time.Time {
	var due []*storedReport
	var next time.Time
	t.opts.DB.View(func(tx *bbolt.Tx) error {
		for _, r := range allReports(tx) {
			if r.State != statePending {
				continue
			}
			if !r.Next.After(now) {
				due = append(due, r)
			} else if next.IsZero() || r.Next.Before(next) {
				next = r.Next
			}
		}
		return nil
	})
	for _, res := range t.deliverAll(ctx, due) {
		if res.State == statePending && (next.IsZero() || res.Next.Before(next)) {
			next = res.Next
		}
	}
	return next
}

// deliverAll makes one attempt at each report, a few at a time.
func (t *Reporter) deliverAll(ctx context.Context, reps []*storedReport) []SendResult {
	out := make([]SendResult, len(reps))
	sem := make(chan struct{}, senders)
	var wg sync.WaitGroup
	for i, rep := range reps {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			t.attempt(ctx, rep)
			out[i] = rep.result(false)
		}()
	}
	wg.Wait()
	return out
}

// attempt sends rep to every rua once: one message for the mailto:
// endpoints, one POST per https: endpoint. One acceptance delivers it;
// otherwise it is retried with backoff for 24 hours (RFC 8460 §5.5).
func (t *Reporter) attempt(ctx context.Context, rep *storedReport) {
	var mailto, errs []string
	var accepted []string
	for _, uri := range rep.RUA {
		ep, err := parseURI(uri)
		switch {
		case err != nil:
			errs = append(errs, uri+": "+err.Error())
		case ep.Err != nil:
			errs = append(errs, uri+": "+ep.Err.Error())
		case ep.Mailbox != "":
			mailto = append(mailto, ep.Mailbox)
		default:
			if err := t.post(ctx, rep, ep.URL); err != nil {
				metricDeliveries.WithLabelValues("https", "error").Inc()
				errs = append(errs, uri+": "+oneLine(err.Error()))
				t.log.Warn("tlsrpt: report POST failed", "domain", rep.Domain, "report_id", rep.ReportID, "url", ep.URL, "err", err)
			} else {
				metricDeliveries.WithLabelValues("https", "ok").Inc()
				accepted = append(accepted, uri)
			}
		}
	}
	if len(mailto) > 0 {
		if err := t.sendMail(ctx, rep, mailto); err != nil {
			metricDeliveries.WithLabelValues("mailto", "error").Inc()
			errs = append(errs, "mailto:"+strings.Join(mailto, ",")+": "+oneLine(err.Error()))
			t.log.Error("tlsrpt: report mail not queued", "domain", rep.Domain, "report_id", rep.ReportID, "err", err)
		} else {
			metricDeliveries.WithLabelValues("mailto", "ok").Inc()
			for _, m := range mailto {
				accepted = append(accepted, "mailto:"+m)
			}
		}
	}
	now := t.opts.Now()
	rep.Attempts++
	rep.LastError = strings.Join(errs, "; ")
	switch {
	case len(accepted) > 0:
		rep.State, rep.Sent, rep.SentTo, rep.Next = stateSent, now, accepted, time.Time{}
		metricReports.WithLabelValues(stateSent).Inc()
		t.log.Info("tlsrpt: report sent", "domain", rep.Domain, "report_id", rep.ReportID, "day", rep.Day,
			"to", strings.Join(accepted, ","), "successful", rep.Successful, "failed", rep.Failed)
	case ctx.Err() != nil:
		// Cut off by shutdown: not the endpoint's fault; due again at once.
		rep.Attempts--
	case now.Sub(rep.Created) >= retryWindow:
		rep.State, rep.Next = stateFailed, time.Time{}
		metricReports.WithLabelValues(stateFailed).Inc()
		t.log.Error("tlsrpt: report given up after 24 hours of retries", "domain", rep.Domain, "report_id", rep.ReportID,
			"attempts", rep.Attempts, "err", rep.LastError)
	default:
		wait := backoff[min(rep.Attempts, len(backoff))-1]
		wait += rand.N(wait/10 + 1)
		rep.Next = now.Add(wait)
		if end := rep.Created.Add(retryWindow); rep.Next.After(end) {
			rep.Next = end
		}
		t.log.Warn("tlsrpt: report not delivered; will retry", "domain", rep.Domain, "report_id", rep.ReportID,
			"attempts", rep.Attempts, "next", rep.Next.UTC().Format(time.RFC3339), "err", rep.LastError)
	}
	t.save(rep)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
