package queue

import (
	"errors"
	"fmt"
	"net/http"
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
}

// ActionResult is the reply to an admin action.
type ActionResult struct {
	ID      string `json:"id,omitempty"`
	Changed int    `json:"changed"` // recipients (messages for retry-all) the action changed
}

func info(m *message) MessageInfo {
	mi := MessageInfo{
		ID: m.ID, From: m.Envelope.From, Size: m.Size, Created: m.Arrived,
		User: m.Envelope.User, ClientAddr: m.Envelope.ClientAddr,
		Ret: m.Envelope.Ret, EnvID: m.Envelope.EnvID, RequireTLS: m.Envelope.RequireTLS,
		Recipients: []RecipientInfo{},
	}
	for _, r := range m.Recipients {
		ri := RecipientInfo{
			Address: r.Addr, State: r.State, Attempts: r.Attempts,
			LastCode: r.Last.Code, LastEnhanced: r.Last.Enhanced, LastText: r.Last.Text, LastMX: r.LastMX,
		}
		if r.pending() {
			ri.NextAttempt = &r.NextAttempt
		}
		mi.Recipients = append(mi.Recipients, ri)
	}
	return mi
}

// List returns every message in the queue, oldest first.
func (q *Queue) List() ([]MessageInfo, error) {
	list := []MessageInfo{}
	err := q.db.View(func(tx *bbolt.Tx) error {
		return tx.Bucket(bucketMessages).ForEach(func(k, v []byte) error {
			m, err := decodeMessage(v)
			if err != nil {
				list = append(list, MessageInfo{ID: string(k), From: "(damaged record)"})
				return nil
			}
			list = append(list, info(m))
			return nil
		})
	})
	return list, err
}

// Show returns one message with its header section (up to 64 KiB).
func (q *Queue) Show(id string) (*MessageInfo, error) {
	var mi *MessageInfo
	err := q.db.View(func(tx *bbolt.Tx) error {
		m, err := getMessage(tx, id)
		if err != nil || m == nil {
			return err
		}
		h, err := q.spool.read(locOf(m), 64<<10)
		if err != nil {
			return err
		}
		x := info(m)
		x.Headers = string(headerSection(h))
		mi = &x
		return nil
	})
	if err == nil && mi == nil {
		err = fmt.Errorf("%s: %w", id, ErrNotFound)
	}
	return mi, err
}

// change applies fn to message id in one commit with any DSN it calls for.
// fn returns how many recipients it changed.
func (q *Queue) change(id string, fn func(m *message, now time.Time) (int, []dsnRecipient)) (int, error) {
	var m, dsn *message
	var n int
	err := q.commit.do(func(tx *bbolt.Tx) error {
		var err error
		if m, err = getMessage(tx, id); err != nil {
			return err
		}
		if m == nil {
			return fmt.Errorf("%s: %w", id, ErrNotFound)
		}
		now := q.opts.Now()
		var notices []dsnRecipient
		n, notices = fn(m, now)
		dsn = nil
		if len(notices) > 0 && m.Envelope.From != "" {
			if dsn, err = q.makeDSN(tx, m, notices, now); err != nil {
				return err
			}
		}
		if n == 0 {
			return nil
		}
		if m.done() {
			return deleteMessage(tx, m.ID)
		}
		return putMessage(tx, m)
	}, func() {
		q.indexPut(m)
		if dsn != nil {
			q.indexPut(dsn)
		}
	})
	if err != nil {
		return 0, err
	}
	if dsn != nil {
		metricEnqueued.Inc()
		q.log.Info("queued DSN", "id", dsn.ID, "orig_id", m.ID, "to", m.Envelope.From)
	}
	q.wake()
	return n, nil
}

// Retry makes the queued and deferred recipients of id due now.
func (q *Queue) Retry(id string) (int, error) {
	n, err := q.change(id, func(m *message, now time.Time) (int, []dsnRecipient) { return retryNow(m, now), nil })
	if err == nil {
		q.log.Info("retry requested", "id", id, "recipients", n)
	}
	return n, err
}

func retryNow(m *message, now time.Time) int {
	n := 0
	for i := range m.Recipients {
		if r := &m.Recipients[i]; r.pending() {
			r.NextAttempt = now
			n++
		}
	}
	return n
}

// RetryAll makes every queued and deferred recipient due now and returns
// how many messages that changed.
func (q *Queue) RetryAll() (int, error) {
	var changed []*message
	err := q.commit.do(func(tx *bbolt.Tx) error {
		changed = changed[:0]
		now := q.opts.Now()
		b := tx.Bucket(bucketMessages)
		var ids []string
		if err := b.ForEach(func(k, _ []byte) error { ids = append(ids, string(k)); return nil }); err != nil {
			return err
		}
		for _, id := range ids {
			m, err := getMessage(tx, id)
			if err != nil {
				continue // damaged; List shows it
			}
			if m != nil && retryNow(m, now) > 0 {
				if err := putMessage(tx, m); err != nil {
					return err
				}
				changed = append(changed, m)
			}
		}
		return nil
	}, func() {
		for _, m := range changed {
			q.indexPut(m)
		}
	})
	if err != nil {
		return 0, err
	}
	q.wake()
	q.log.Info("retry requested for the whole queue", "messages", len(changed))
	return len(changed), nil
}

// Hold stops delivery of the pending recipients of id until Release.
func (q *Queue) Hold(id string) (int, error) {
	n, err := q.change(id, func(m *message, _ time.Time) (int, []dsnRecipient) {
		n := 0
		for i := range m.Recipients {
			if r := &m.Recipients[i]; r.pending() {
				r.State = StateHeld
				n++
			}
		}
		return n, nil
	})
	if err == nil {
		q.log.Info("held", "id", id, "recipients", n)
	}
	return n, err
}

// Release makes the held recipients of id due now.
func (q *Queue) Release(id string) (int, error) {
	n, err := q.change(id, func(m *message, now time.Time) (int, []dsnRecipient) {
		n := 0
		for i := range m.Recipients {
			if r := &m.Recipients[i]; r.State == StateHeld {
				r.State = StateDeferred
				if r.Attempts == 0 {
					r.State = StateQueued
				}
				r.NextAttempt = now
				n++
			}
		}
		return n, nil
	})
	if err == nil {
		q.log.Info("released", "id", id, "recipients", n)
	}
	return n, err
}

// Bounce fails every recipient of id not yet delivered and sends the
// sender a DSN, as NOTIFY allows.
func (q *Queue) Bounce(id string) (int, error) {
	n, err := q.change(id, func(m *message, now time.Time) (int, []dsnRecipient) {
		n := 0
		var notices []dsnRecipient
		for i := range m.Recipients {
			r := &m.Recipients[i]
			if r.State.Final() {
				continue
			}
			r.State = StateFailed
			r.Last = Status{Code: 554, Enhanced: "5.0.0", Text: "bounced by the mail system administrator"}
			n++
			if a := noticeFor(r, outcomeFailed, r.Last); a != "" {
				notices = append(notices, dsnRecipient{recipient: *r, Action: a})
			}
		}
		return n, notices
	})
	if err == nil {
		metricDeliveries.WithLabelValues(outcomeFailed).Add(float64(n))
		q.log.Info("bounced by the administrator", "id", id, "recipients", n)
	}
	return n, err
}

// Delete removes id from the queue without notifying anyone.
func (q *Queue) Delete(id string) error {
	err := q.commit.do(func(tx *bbolt.Tx) error {
		if tx.Bucket(bucketMessages).Get([]byte(id)) == nil {
			return fmt.Errorf("%s: %w", id, ErrNotFound)
		}
		return deleteMessage(tx, id)
	}, func() {
		q.mu.Lock()
		defer q.mu.Unlock()
		if e := q.index[id]; e != nil {
			q.indexRemoveLocked(e)
		} else {
			q.spool.remove(id) // a damaged record was never indexed
		}
	})
	if err != nil {
		return err
	}
	q.log.Info("deleted by the administrator", "id", id)
	return nil
}

// RegisterAdmin adds the queue's admin routes to mux (JSON in and out):
//
//	GET    /queue               list
//	GET    /queue/{id}          show
//	POST   /queue/{id}/retry    retry now
//	POST   /queue/retry-all     retry everything now
//	POST   /queue/{id}/hold     hold
//	POST   /queue/{id}/release  release
//	POST   /queue/{id}/bounce   fail and notify the sender
//	DELETE /queue/{id}          delete silently
func (q *Queue) RegisterAdmin(mux *http.ServeMux) {
	mux.HandleFunc("GET /queue", func(w http.ResponseWriter, r *http.Request) {
		list, err := q.List()
		if err != nil {
			admin.WriteError(w, http.StatusInternalServerError, "reading the queue: "+err.Error())
			return
		}
		admin.WriteJSON(w, http.StatusOK, list)
	})
	mux.HandleFunc("GET /queue/{id}", func(w http.ResponseWriter, r *http.Request) {
		mi, err := q.Show(r.PathValue("id"))
		if err != nil {
			writeErr(w, err)
			return
		}
		admin.WriteJSON(w, http.StatusOK, mi)
	})
	mux.HandleFunc("POST /queue/retry-all", func(w http.ResponseWriter, r *http.Request) {
		n, err := q.RetryAll()
		if err != nil {
			writeErr(w, err)
			return
		}
		admin.WriteJSON(w, http.StatusOK, ActionResult{Changed: n})
	})
	action := func(fn func(string) (int, error)) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			id := r.PathValue("id")
			n, err := fn(id)
			if err != nil {
				writeErr(w, err)
				return
			}
			admin.WriteJSON(w, http.StatusOK, ActionResult{ID: id, Changed: n})
		}
	}
	mux.HandleFunc("POST /queue/{id}/retry", action(q.Retry))
	mux.HandleFunc("POST /queue/{id}/hold", action(q.Hold))
	mux.HandleFunc("POST /queue/{id}/release", action(q.Release))
	mux.HandleFunc("POST /queue/{id}/bounce", action(q.Bounce))
	mux.HandleFunc("DELETE /queue/{id}", action(func(id string) (int, error) { return 0, q.Delete(id) }))
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
