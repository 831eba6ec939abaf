package queue

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/stsrelay/stsrelay/admin"
	"go.etcd.io/bbolt"
)

// ErrNotFound is returned for a queue id that is not in the queue.
var ErrNotFound = errors.New("no such message in the queue")

// MessageInfo is one message as the admin API and `stsrelay queue` show it.
type MessageInfo struct {
	ID         string          `json:"id"`
	From       string          `json:"from"` // "" is the null sender <>
	Size       int64           `json:"size"`
	Created    time.Time       `json:"created"`
	User       string          `json:"user,omitempty"`
	ClientAddr string          `json:"client_addr,omitempty"`
	MessageID  string          `json:"message_id,omitempty"`
	Ret        string          `json:"ret,omitempty"`
	EnvID      string          `json:"envid,omitempty"`
	RequireTLS bool            `json:"requiretls,omitempty"`
	Recipients []RecipientInfo `json:"recipients"`
	Headers    string          `json:"headers,omitempty"` // only from Show
}

// RecipientInfo is one recipient's delivery state.
type RecipientInfo struct {
	Address      string     `json:"address"`
	State        State      `json:"state"`
	Attempts     int        `json:"attempts"`
	NextAttempt  *time.Time `json:"next_attempt"` // null unless queued or deferred
	LastCode     int        `json:"last_code"`    // 0 before the first attempt
	LastEnhanced string     `json:"last_enhanced_code"`
	LastText     string     `json:"last_text"`
	LastMX       string     `json:"last_mx"` // "" when no MX host was reached
	// NoticeOwed is the Action of a DSN owed to the sender about this
	// recipient and not queued yet (its body could not be written).
	NoticeOwed string `json:"notice_owed,omitempty"`
}

// ActionResult is the reply to an admin action.
type ActionResult struct {
	ID      string `json:"id,omitempty"`
	Changed int    `json:"changed"` // recipients the action changed
}

func info(m *message) MessageInfo {
	mi := MessageInfo{
		ID: m.ID, From: m.Envelope.From, Size: m.Size, Created: m.Arrived,
		User: m.Envelope.User, ClientAddr: m.Envelope.ClientAddr, MessageID: m.Envelope.MessageID,
		Ret: m.Envelope.Ret, EnvID: m.Envelope.EnvID, RequireTLS: m.Envelope.RequireTLS,
		Recipients: []RecipientInfo{},
	}
	for _, r := range m.Recipients {
		ri := RecipientInfo{
			Address: r.Addr, State: r.State, Attempts: r.Attempts,
			LastCode: r.Last.Code, LastEnhanced: r.Last.Enhanced, LastText: r.Last.Text, LastMX: r.LastMX,
			NoticeOwed: r.NoticeOwed,
		}
		if r.pending() {
			ri.NextAttempt = &r.NextAttempt
		}
		mi.Recipients = append(mi.Recipients, ri)
	}
	return mi
}

// List returns up to limit messages after the id after, oldest first
// (Reader.List).
func (q *Queue) List(after string, limit int) (*Page, error) { return q.reader.List(after, limit) }

// Show returns one message with its header section (up to 64 KiB). The
// body is held as a delivery holds it (holdBody): a delete meanwhile must
// not punch its stretch out under the read, which would show zeros.
func (q *Queue) Show(id string) (*MessageInfo, error) {
	e, err := q.indexed(id)
	if err != nil {
		return nil, err
	}
	if err := q.holdBody(e); err != nil {
		return nil, err
	}
	defer q.closeBody(e)
	return q.reader.Show(id)
}

// Message opens the stored message id (Reader.Message).
// It is an open reader of the body, as a delivery's is (openBody): a
// delete meanwhile must not punch the stretch out under it, or queue show
// would print zeros.
func (q *Queue) Message(id string) (io.ReadCloser, error) {
	e, err := q.indexed(id)
	if err != nil {
		return nil, err
	}
	return q.openBody(e)
}

// indexed returns the index entry of the message id.
func (q *Queue) indexed(id string) (*entry, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if e := q.entryLocked(id); e != nil {
		return e, nil
	}
	return nil, fmt.Errorf("%s: %w", id, ErrNotFound)
}

// Summary counts the waiting recipients by domain and age (Reader.Summary).
func (q *Queue) Summary() (*Summary, error) { return q.reader.Summary() }

// An action changes the recipients of a message that pick selects and
// returns how many it changed. The DSNs it calls for are marked owed
// (recipient.NoticeOwed) for apply to queue.
type action func(m *message, pick func(*recipient) bool, now time.Time) int

// actions are the changing queue commands, by name.
var actions = map[string]action{
	"retry":   retryRecipients,
	"hold":    holdRecipients,
	"release": releaseRecipients,
	"bounce":  bounceRecipients,
	"delete":  deleteRecipients,
}

// retryRecipients makes the picked queued and deferred recipients due now.
// The attempt the schedule had planned is kept in ResumeAt: if the retry
// fails, the schedule goes on from there (applyStatus).
func retryRecipients(m *message, pick func(*recipient) bool, now time.Time) int {
	n := 0
	for i := range m.Recipients {
		r := &m.Recipients[i]
		if !r.pending() || !pick(r) {
			continue
		}
		if r.State == StateDeferred && r.NextAttempt.After(now) && r.ResumeAt.IsZero() {
			r.ResumeAt = r.NextAttempt
		}
		r.NextAttempt = now
		n++
	}
	return n
}

func holdRecipients(m *message, pick func(*recipient) bool, _ time.Time) int {
	n := 0
	for i := range m.Recipients {
		if r := &m.Recipients[i]; r.pending() && pick(r) {
			r.State, r.ResumeAt = StateHeld, time.Time{}
			n++
		}
	}
	return n
}

func releaseRecipients(m *message, pick func(*recipient) bool, now time.Time) int {
	n := 0
	for i := range m.Recipients {
		if r := &m.Recipients[i]; r.State == StateHeld && pick(r) {
			r.State = StateDeferred
			if r.Attempts == 0 {
				r.State = StateQueued
			}
			r.NextAttempt = now
			n++
		}
	}
	return n
}

// bounceRecipients fails the picked recipients that are not final yet and
// owes the sender a DSN about them, as NOTIFY allows.
func bounceRecipients(m *message, pick func(*recipient) bool, _ time.Time) int {
	n := 0
	notify := canNotify(m)
	for i := range m.Recipients {
		r := &m.Recipients[i]
		if r.State.Final() || !pick(r) {
			continue
		}
		r.State = StateFailed
		r.Last = Status{Code: 554, Enhanced: "5.0.0", Text: cutCauses["bounce"].Error()}
		n++
		if a := noticeFor(r, outcomeFailed, r.Last); a != "" && notify {
			r.NoticeOwed = a
		} else if r.NoticeOwed == "delayed" {
			r.NoticeOwed = ""
		}
	}
	return n
}

// deleteRecipients drops the picked recipients without notifying anyone;
// a message goes with its last waiting recipient.
func deleteRecipients(m *message, pick func(*recipient) bool, _ time.Time) int {
	n := 0
	for i := range m.Recipients {
		r := &m.Recipients[i]
		if r.State.Final() || !pick(r) {
			continue
		}
		r.State = StateFailed
		r.Last = Status{Code: 554, Enhanced: "5.0.0", Text: cutCauses["delete"].Error()}
		r.NoticeOwed = "" // a delay notice still owed, say
		n++
	}
	return n
}

func everyone(*recipient) bool { return true }

// cutCauses say why an operator's command took recipients away: the
// status of a bounced or deleted recipient, and the cause of the
// deliveries in flight it cuts off (their status text and log line carry
// it). A retry or a release takes no one away.
var cutCauses = map[string]error{
	"bounce": errors.New("bounced by the mail system administrator"),
	"delete": errors.New("deleted by the mail system administrator"),
	"hold":   errors.New("held by the mail system administrator"),
}

// carriersLocked returns the cancel functions of the deliveries of m in flight
// that carry one of the recipients gone (indexes into m's record), which
// an operator's command took away: a postmaster who bounces, deletes or
// holds a message expects the transfer to stop. A delivery that has not
// read its recipients yet may have read them before the command's commit,
// so it counts when one of them is at its domain. The outcome of a
// delivery cut off so is recorded as that of one cut off by a stop
// (applyOutcome).
func (q *Queue) carriersLocked(m *message, gone []int) []context.CancelCauseFunc {
	e := q.entryLocked(m.ID)
	if e == nil {
		return nil
	}
	var cut []context.CancelCauseFunc
	for s := range e.slots {
		if s.cancel == nil {
			continue
		}
		for _, i := range gone {
			if slices.Contains(s.carrying, i) || s.carrying == nil && m.Recipients[i].Domain == s.domain {
				cut = append(cut, s.cancel)
				break
			}
		}
	}
	return cut
}

// changed is what one commit of an action did.
type changed struct {
	messages, recipients int
}

// apply runs the action named name on the messages ids in one commit, then
// queues the DSNs it calls for (sendNotices: a DSN that cannot be written
// stays owed and does not undo the action). A message that is gone
// meanwhile is skipped. Once committed, a bounce, delete or hold cuts off
// the deliveries in flight of the recipients it failed or held (carriersLocked).
// A delete returns once the text of the messages it finished is off the
// disk, as Delete does.
func (q *Queue) apply(ids []string, name string, sel *Selector) (changed, error) {
	act := actions[name]
	cause := cutCauses[name]
	var res changed
	var touched []*message
	var gone [][]int // of each touched message, the recipients no longer pending
	var ticket uint64
	err := q.commit.do(func(tx *bbolt.Tx) error {
		res, touched, gone = changed{}, touched[:0], gone[:0]
		now := q.opts.Now()
		for _, id := range ids {
			m, err := q.recs.get(tx, id)
			if err != nil || m == nil {
				continue // gone, or damaged: only a delete by id removes that
			}
			pick := everyone
			if sel != nil {
				if !sel.matchSender(m) {
					continue
				}
				pick = sel.picker(now)
			}
			var was []bool
			if cause != nil {
				was = make([]bool, len(m.Recipients))
				for i := range m.Recipients {
					was[i] = m.Recipients[i].pending()
				}
			}
			n := act(m, pick, now)
			if n == 0 {
				continue
			}
			res.messages++
			res.recipients += n
			if err := q.recs.save(tx, m); err != nil {
				return err
			}
			var g []int
			for i := range was {
				if was[i] && !m.Recipients[i].pending() {
					g = append(g, i)
				}
			}
			touched, gone = append(touched, m), append(gone, g)
		}
		return nil
	}, func() {
		for k, m := range touched {
			// One hold of q.mu for both: a delivery dispatched between
			// them would take the first copy in memory, which still has
			// the recipients the command took away, and would be cut off
			// by no one.
			var cut []context.CancelCauseFunc
			q.mu.Lock()
			if len(gone[k]) > 0 {
				cut = q.carriersLocked(m, gone[k])
			}
			q.indexPutLocked(m, nil)
			q.mu.Unlock()
			if name == "delete" && m.done() && m.BodyFile != "" {
				ticket = q.spool.flush(m.BodyFile)
			}
			// Only once the index follows the record: the slot of a
			// delivery cut off is due again at once, and its next attempt
			// must not take the first copy in memory, which still has
			// the recipients the command took away.
			for _, cancel := range cut {
				cancel(cause)
			}
		}
	})
	if err != nil {
		return changed{}, err
	}
	q.spool.waitFor(ticket)
	var owing []string
	for _, m := range touched {
		if m.owesNotice() {
			owing = append(owing, m.ID)
		}
	}
	if len(owing) > 0 {
		q.sendNotices(owing)
	}
	q.wake()
	return res, nil
}

// change applies the action named name to every recipient of message id.
func (q *Queue) change(name, id string) (int, error) {
	err := q.db.View(func(tx *bbolt.Tx) error {
		m, err := getMessage(tx, id)
		if err == nil && m == nil {
			err = fmt.Errorf("%s: %w", id, ErrNotFound)
		}
		return err
	})
	if err != nil {
		return 0, err
	}
	res, err := q.apply([]string{id}, name, nil)
	n := res.recipients
	if name == "bounce" {
		metricDeliveries.WithLabelValues(outcomeFailed).Add(float64(n))
	}
	return n, err
}

// Retry makes the queued and deferred recipients of id due now. If that
// attempt fails, the next one follows the schedule as if it had not
// happened.
func (q *Queue) Retry(id string) (int, error) { return q.change("retry", id) }

// Hold stops delivery of the pending recipients of id until Release,
// cutting off the deliveries in flight.
func (q *Queue) Hold(id string) (int, error) { return q.change("hold", id) }

// Release makes the held recipients of id due now.
func (q *Queue) Release(id string) (int, error) { return q.change("release", id) }

// Bounce fails every recipient of id not yet delivered and sends the
// sender a DSN, as NOTIFY allows. Deliveries in flight are cut off.
func (q *Queue) Bounce(id string) (int, error) { return q.change("bounce", id) }

// Delete removes id from the queue without notifying anyone, and cuts
// off its deliveries in flight. It also removes a damaged record, which
// no other command can read.
func (q *Queue) Delete(id string) error {
	var ticket uint64
	err := q.commit.do(func(tx *bbolt.Tx) error {
		if tx.Bucket(bucketMessages).Get([]byte(id)) == nil {
			return fmt.Errorf("%s: %w", id, ErrNotFound)
		}
		return q.recs.delete(tx, id)
	}, func() {
		q.mu.Lock()
		defer q.mu.Unlock()
		if e := q.entryLocked(id); e != nil {
			for s := range e.slots {
				if s.cancel != nil {
					s.cancel(cutCauses["delete"])
				}
			}
			q.indexRemoveLocked(e)
			if e.bodyFile != "" {
				// An operator who deletes a message expects its text gone
				// from the disk when the command returns, not when its
				// segment fills. A delivery still reading it frees it as
				// it closes it (closeBody); the delete does not wait.
				ticket = q.spool.flush(e.bodyFile)
			}
		} else {
			q.spool.remove(id) // a damaged record was never indexed
		}
	})
	if err == nil {
		q.spool.waitFor(ticket)
	}
	return err
}

// Selector picks messages and recipients for a bulk action. The filters
// combine: a recipient is picked when its message's sender, its domain
// and its status match those given; All alone picks everything.
type Selector struct {
	All    bool   `json:"all,omitempty"`
	Domain string `json:"domain,omitempty"` // recipient domain
	Sender string `json:"sender,omitempty"` // envelope sender; "<>" is the null sender
	Status string `json:"status,omitempty"` // active | deferred | held
}

// check normalizes s and says what is wrong with it.
func (s *Selector) check() error {
	if !s.All && s.Domain == "" && s.Sender == "" && s.Status == "" {
		return errors.New("nothing selected: give all, or a domain, sender or status")
	}
	if s.Domain != "" {
		d, err := RecipientDomain("x@" + s.Domain)
		if err != nil {
			return fmt.Errorf("domain %q is not a domain name", s.Domain)
		}
		s.Domain = d
	}
	switch s.Status {
	case "", StatusActive, StatusDeferred, StatusHeld:
	default:
		return fmt.Errorf("status %q is not one of active, deferred, held", s.Status)
	}
	return nil
}

func (s *Selector) matchSender(m *message) bool {
	switch s.Sender {
	case "":
		return true
	case "<>":
		return m.Envelope.From == ""
	}
	return strings.EqualFold(strings.Trim(s.Sender, "<>"), m.Envelope.From)
}

func (s *Selector) picker(now time.Time) func(*recipient) bool {
	return func(r *recipient) bool {
		return (s.Domain == "" || r.Domain == s.Domain) && (s.Status == "" || statusOf(r, now) == s.Status)
	}
}

// BulkResult is what a bulk action changed.
type BulkResult struct {
	Messages   int `json:"messages"`
	Recipients int `json:"recipients"`
}

// ConfirmError refuses to delete or bounce more than one message without
// a confirmation.
type ConfirmError struct {
	Action   string
	Messages int
}

func (e *ConfirmError) Error() string {
	return fmt.Sprintf("%d messages match; run again with -yes to %s them all", e.Messages, e.Action)
}

// bulkChunk bounds the messages changed in one commit, so that a bulk
// action over a large queue does not hold up submissions and deliveries
// with one huge transaction.
const bulkChunk = 500

// Select applies the action named name (retry, hold, release, bounce,
// delete) to the recipients sel picks. Deleting or bouncing more than
// one message needs confirm; without it Select changes nothing and
// returns a *ConfirmError.
func (q *Queue) Select(name string, sel Selector, confirm bool) (BulkResult, error) {
	act, ok := actions[name]
	if !ok {
		return BulkResult{}, fmt.Errorf("%q is not a queue action", name)
	}
	if err := sel.check(); err != nil {
		return BulkResult{}, err
	}
	// Find what would change, on copies read page by page.
	var ids []string
	now := q.opts.Now()
	pick := sel.picker(now)
	err := q.reader.each(func(m *message) {
		if sel.matchSender(m) {
			if act(m, pick, now) > 0 {
				ids = append(ids, m.ID)
			}
		}
	})
	if err != nil {
		return BulkResult{}, err
	}
	if (name == "delete" || name == "bounce") && len(ids) > 1 && !confirm {
		return BulkResult{}, &ConfirmError{Action: name, Messages: len(ids)}
	}
	var total BulkResult
	for chunk := range slices.Chunk(ids, bulkChunk) {
		res, err := q.apply(chunk, name, &sel)
		total.Messages += res.messages
		total.Recipients += res.recipients
		if err != nil {
			return total, err
		}
	}
	if name == "bounce" {
		metricDeliveries.WithLabelValues(outcomeFailed).Add(float64(total.Recipients))
	}
	return total, nil
}

// RegisterAdmin adds the queue's admin routes to mux (JSON in and out,
// except the stored message):
//
//	GET    /queue?after=ID&limit=N  one page of the listing (Page)
//	GET    /queue/summary           counts by domain, age and reason (Summary)
//	GET    /queue/{id}              one message (MessageInfo)
//	GET    /queue/{id}/message      the stored message; ?headers=1 for its header section
//	POST   /queue/{id}/retry        retry now
//	POST   /queue/{id}/hold         hold
//	POST   /queue/{id}/release      release
//	POST   /queue/{id}/bounce       fail and notify the sender
//	DELETE /queue/{id}              delete silently
//	POST   /queue/{action}          a bulk action: BulkRequest in, BulkResult out
//
// Every change is logged with the uid of the process that asked.
func (q *Queue) RegisterAdmin(mux *http.ServeMux) {
	mux.HandleFunc("GET /queue", func(w http.ResponseWriter, r *http.Request) {
		limit := 0
		if l := r.URL.Query().Get("limit"); l != "" {
			n, err := strconv.Atoi(l)
			if err != nil || n <= 0 {
				admin.WriteError(w, http.StatusBadRequest, "limit must be a positive number")
				return
			}
			limit = n
		}
		page, err := q.List(r.URL.Query().Get("after"), limit)
		if err != nil {
			admin.WriteError(w, http.StatusInternalServerError, "reading the queue: "+err.Error())
			return
		}
		admin.WriteJSON(w, http.StatusOK, page)
	})
	mux.HandleFunc("GET /queue/summary", func(w http.ResponseWriter, r *http.Request) {
		s, err := q.Summary()
		if err != nil {
			admin.WriteError(w, http.StatusInternalServerError, "reading the queue: "+err.Error())
			return
		}
		admin.WriteJSON(w, http.StatusOK, s)
	})
	mux.HandleFunc("GET /queue/{id}", func(w http.ResponseWriter, r *http.Request) {
		mi, err := q.Show(r.PathValue("id"))
		if err != nil {
			writeErr(w, err)
			return
		}
		admin.WriteJSON(w, http.StatusOK, mi)
	})
	mux.HandleFunc("GET /queue/{id}/message", func(w http.ResponseWriter, r *http.Request) {
		rc, err := q.Message(r.PathValue("id"))
		if err != nil {
			writeErr(w, err)
			return
		}
		defer rc.Close()
		w.Header().Set("Content-Type", "message/rfc822")
		if r.URL.Query().Get("headers") != "" {
			h, _ := io.ReadAll(io.LimitReader(rc, maxHeaderBytes))
			w.Write(headerSection(h))
			return
		}
		io.Copy(w, rc)
	})
	action := func(name string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			id := r.PathValue("id")
			var n int
			var err error
			if name == "delete" {
				err = q.Delete(id)
			} else {
				n, err = q.change(name, id)
			}
			if err != nil {
				writeErr(w, err)
				return
			}
			attrs := []any{"id", id}
			if name != "delete" {
				attrs = append(attrs, "recipients", n)
			}
			q.log.Info("queue "+name+" by the administrator", append(attrs, admin.CallerAttrs(r.Context())...)...)
			admin.WriteJSON(w, http.StatusOK, ActionResult{ID: id, Changed: n})
		}
	}
	mux.HandleFunc("POST /queue/{id}/retry", action("retry"))
	mux.HandleFunc("POST /queue/{id}/hold", action("hold"))
	mux.HandleFunc("POST /queue/{id}/release", action("release"))
	mux.HandleFunc("POST /queue/{id}/bounce", action("bounce"))
	mux.HandleFunc("DELETE /queue/{id}", action("delete"))
	mux.HandleFunc("POST /queue/{action}", func(w http.ResponseWriter, r *http.Request) {
		name := r.PathValue("action")
		if _, ok := actions[name]; !ok {
			admin.WriteError(w, http.StatusNotFound, fmt.Sprintf("%q is not a queue action", name))
			return
		}
		var req BulkRequest
		if err := admin.ReadJSON(r, &req); err != nil {
			admin.WriteError(w, http.StatusBadRequest, err.Error())
			return
		}
		res, err := q.Select(name, req.Selector, req.Yes)
		if err != nil {
			var ce *ConfirmError
			switch {
			case errors.As(err, &ce):
				admin.WriteError(w, http.StatusConflict, err.Error())
			case res.Messages == 0 && !errors.Is(err, ErrClosed):
				admin.WriteError(w, http.StatusBadRequest, err.Error())
			default:
				writeErr(w, err)
			}
			if res.Messages == 0 {
				return
			}
		}
		attrs := []any{"messages", res.Messages, "recipients", res.Recipients}
		attrs = append(attrs, req.Selector.attrs()...)
		q.log.Info("queue "+name+" by the administrator", append(attrs, admin.CallerAttrs(r.Context())...)...)
		if err == nil {
			admin.WriteJSON(w, http.StatusOK, res)
		}
	})
}

// BulkRequest is the body of a bulk action: the selection, and Yes to
// confirm deleting or bouncing more than one message.
type BulkRequest struct {
	Selector
	Yes bool `json:"yes,omitempty"`
}

// attrs are the selection's filters, for the log line.
func (s *Selector) attrs() []any {
	var a []any
	if s.All {
		a = append(a, "all", true)
	}
	if s.Domain != "" {
		a = append(a, "domain", s.Domain)
	}
	if s.Sender != "" {
		a = append(a, "sender", s.Sender)
	}
	if s.Status != "" {
		a = append(a, "status", s.Status)
	}
	return a
}

func writeErr(w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, ErrNotFound):
		admin.WriteError(w, http.StatusNotFound, err.Error())
	case errors.Is(err, ErrClosed):
		admin.WriteError(w, http.StatusServiceUnavailable, err.Error())
	default:
		admin.WriteError(w, http.StatusInternalServerError, err.Error())
	}
}
