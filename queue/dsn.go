package queue

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"mime/multipart"
	"net/textproto"
	"strings"
	"time"

	"go.etcd.io/bbolt"
)

// dsnRecipient is one per-recipient block of a DSN.
type dsnRecipient struct {
	recipient
	Action string // failed, delayed, delivered, relayed (RFC 3464 §2.3.3)
}

// maxHeaderBytes bounds the original header section copied into a DSN.
const maxHeaderBytes = 256 << 10

// rfc5322Date is the date format of RFC 5322 §3.3, numeric zone
// (RFC 3464 wants numeric time zones in its date fields).
const rfc5322Date = "Mon, 02 Jan 2006 15:04:05 -0700"

// makeDSN builds a delivery status notification (RFC 3464) about orig for
// rcpts and stores it in tx as a new message from the null sender to the
// original envelope sender (RFC 5321 §4.5.5), so it travels this same queue.
func (q *Queue) makeDSN(tx *bbolt.Tx, orig *message, rcpts []dsnRecipient, now time.Time) (*message, error) {
	body, full, err := q.dsnBody(orig, rcpts, now)
	if err != nil {
		return nil, err
	}
	env := Envelope{
		From:       "",
		Recipients: nil,
		SMTPUTF8:   orig.Envelope.SMTPUTF8,
		Body8Bit:   full && orig.Envelope.Body8Bit,
		RequireTLS: orig.Envelope.RequireTLS, // RFC 8689 §5: bounces keep REQUIRETLS
	}
	d, err := recipientDomain(orig.Envelope.From)
	if err != nil {
		return nil, nil // a sender we cannot route to gets no DSN
	}
	m := &message{
		Envelope:   env,
		Arrived:    now,
		Recipients: []recipient{{RecipientParams: RecipientParams{Addr: orig.Envelope.From}, Domain: d, State: StateQueued, NextAttempt: now}},
	}
	// The body file must be durable before the record commits. If this
	// transaction is then not committed, the file is an orphan that the
	// next start removes.
	if m.ID, m.Size, err = q.spool.write(now, bytes.NewReader(body), int64(len(body))); err != nil {
		return nil, err
	}
	if err := q.spool.syncDir(); err != nil {
		return nil, err
	}
	if err := putMessage(tx, m); err != nil {
		return nil, err
	}
	return m, nil
}

// dsnBody writes the multipart/report message; full reports whether the
// whole original message is attached (RET=FULL) rather than its headers.
func (q *Queue) dsnBody(orig *message, rcpts []dsnRecipient, now time.Time) (body []byte, full bool, err error) {
	worst := "delivered"
	for _, r := range rcpts {
		switch {
		case r.Action == "failed":
			worst = "failed"
		case r.Action == "delayed" && worst != "failed":
			worst = "delayed"
		}
	}
	// RFC 3461 §4.3: RET=FULL asks for the whole message, and only in
	// failure DSNs. Without RET stsrelay returns headers only, and always
	// for REQUIRETLS messages (RFC 8689 §5).
	full = worst == "failed" && strings.EqualFold(orig.Envelope.Ret, "FULL") && !orig.Envelope.RequireTLS
	var original []byte
	if full {
		original, err = q.spool.read(locOf(orig), -1)
	} else {
		original, err = q.spool.read(locOf(orig), maxHeaderBytes)
		original = headerSection(original)
	}
	if err != nil {
		return nil, false, err
	}

	host := q.opts.Hostname
	var b bytes.Buffer
	mw := multipart.NewWriter(&b)
	subject := map[string]string{
		"failed":    "Undelivered Mail Returned to Sender",
		"delayed":   "Delayed Mail (still being retried)",
		"delivered": "Successful Mail Delivery Report",
	}[worst]
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	hdr := []string{
		"From: Mail Delivery System <postmaster@" + host + ">",
		"To: <" + oneLine(orig.Envelope.From) + ">",
		"Subject: " + subject,
		"Date: " + now.Format(rfc5322Date),
		fmt.Sprintf("Message-ID: <%x.dsn@%s>", rnd, host),
		"Auto-Submitted: auto-replied", // RFC 3834 §5
		"MIME-Version: 1.0",
		`Content-Type: multipart/report; report-type=delivery-status; boundary="` + mw.Boundary() + `"`,
		"",
		"This is a MIME-encapsulated message.",
		"",
	}
	b.WriteString(strings.Join(hdr, "\r\n"))

	// Part 1: for people (RFC 3464 §2, RFC 6522).
	w, err := mw.CreatePart(textproto.MIMEHeader{"Content-Type": {"text/plain; charset=utf-8"}})
	if err != nil {
		return nil, false, err
	}
	fmt.Fprintf(w, "This is the mail system at host %s.\r\n\r\n", host)
	switch worst {
	case "failed":
		fmt.Fprintf(w, "Your message could not be delivered to one or more recipients.\r\nIt is attached below.\r\n\r\n")
	case "delayed":
		fmt.Fprintf(w, "Your message could not be delivered yet. The mail system will keep\r\ntrying until %s; you do not need to resend it.\r\n\r\n",
			orig.Arrived.Add(q.opts.MaxQueueTime).Format(rfc5322Date))
	default:
		fmt.Fprintf(w, "Your message was delivered to the following recipients, as you asked.\r\n\r\n")
	}
	for _, r := range rcpts {
		fmt.Fprintf(w, "<%s>: %s\r\n", oneLine(r.Addr), r.Action)
		if r.Last.Code != 0 {
			fmt.Fprintf(w, "    %s\r\n", oneLine(r.Last.String()))
		}
	}

	// Part 2: message/delivery-status (RFC 3464 §2.1–2.3).
	w, err = mw.CreatePart(textproto.MIMEHeader{"Content-Type": {"message/delivery-status"}})
	if err != nil {
		return nil, false, err
	}
	field := func(name, value string) { fmt.Fprintf(w, "%s: %s\r\n", name, oneLine(value)) }
	field("Reporting-MTA", "dns; "+host)
	if orig.Envelope.EnvID != "" {
		field("Original-Envelope-Id", orig.Envelope.EnvID) // only with ENVID (§2.2.1); smtpin decoded the xtext
	}
	field("Arrival-Date", orig.Arrived.Format(rfc5322Date))
	for _, r := range rcpts {
		w.Write([]byte("\r\n"))
		if r.ORcpt != "" {
			field("Original-Recipient", r.ORcpt)
		}
		field("Final-Recipient", "rfc822; "+r.Addr)
		field("Action", r.Action)
		field("Status", statusCode(r.Action, r.Last))
		if r.LastMX != "" {
			field("Remote-MTA", "dns; "+r.LastMX) // only if one was involved (§2.3.5)
		}
		if r.Last.Code != 0 {
			field("Diagnostic-Code", "smtp; "+r.Last.String())
		}
		if !r.LastAttempt.IsZero() {
			field("Last-Attempt-Date", r.LastAttempt.Format(rfc5322Date))
		}
		if r.Action == "delayed" {
			field("Will-Retry-Until", orig.Arrived.Add(q.opts.MaxQueueTime).Format(rfc5322Date)) // delayed only (§2.3.9)
		}
	}

	// Part 3: the original message or its headers (RFC 3464 §2, RFC 6522).
	ct := "text/rfc822-headers"
	if full {
		ct = "message/rfc822"
	}
	w, err = mw.CreatePart(textproto.MIMEHeader{"Content-Type": {ct}})
	if err != nil {
		return nil, false, err
	}
	w.Write(original)
	if err := mw.Close(); err != nil {
		return nil, false, err
	}
	return b.Bytes(), full, nil
}

// statusCode is the RFC 3464 Status field: the enhanced code when it is a
// well-formed one of the right class (RFC 3463 §2), else the class's
// generic code.
func statusCode(action string, st Status) string {
	class := "2"
	switch action {
	case "failed":
		class = "5"
	case "delayed":
		class = "4"
	}
	parts := strings.Split(st.Enhanced, ".")
	if len(parts) == 3 && parts[0] == class && isDigits(parts[1], 3) && isDigits(parts[2], 3) {
		return st.Enhanced
	}
	return class + ".0.0"
}

// isDigits reports whether s is 1 to max ASCII digits.
func isDigits(s string, max int) bool {
	if s == "" || len(s) > max {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// headerSection returns the header section of msg, with its blank line.
func headerSection(msg []byte) []byte {
	if i := bytes.Index(msg, []byte("\r\n\r\n")); i >= 0 {
		return msg[:i+4]
	}
	if i := bytes.Index(msg, []byte("\n\n")); i >= 0 {
		return msg[:i+2]
	}
	return msg
}

// oneLine makes s safe as a header field body: no line breaks or other
// controls, and short enough for RFC 5322's 998-character line limit.
func oneLine(s string) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
	if len(s) > 900 {
		s = strings.ToValidUTF8(s[:900], "") + "…" // not half a character
	}
	return s
}
