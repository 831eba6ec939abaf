package queue

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"net/textproto"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

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

// canNotify reports whether the sender of m can get a DSN: never one
// about a DSN (RFC 5321 §4.5.5), nor one to a sender we cannot route to.
func canNotify(m *message) bool {
	if m.Envelope.From == "" {
		return false
	}
	_, err := RecipientDomain(m.Envelope.From)
	return err == nil
}

// noticeRetry is how long a DSN that could not be written waits before
// the next try.
const noticeRetry = time.Minute

// owedDSN is a DSN written to the spool and not yet committed: its record,
// and the marks (recipient index, Action) of the original it clears.
type owedDSN struct {
	orig, to string // the original's id and sender
	dsn      *message
	marks    map[int]string
}

// sendNotices queues the DSNs owed about the messages ids: one per
// message, about each recipient marked NoticeOwed. An outcome commits its
// recipients' states with the marks first and calls this after: a DSN
// that cannot be written (a full disk) must not undo a delivery, or the
// delivered recipients would get the message again at the retry.
//
// Each DSN body is written and synced to a file of its own, and the
// directory synced, before the commit that adds its record and clears the
// marks, so a committed DSN has its body and a crash before the commit
// leaves only an orphan file for the next start to remove. Nothing is
// written inside the transaction, which may run more than once; a file
// whose record does not commit is removed. A DSN that cannot be written
// keeps its marks, and Run tries again every noticeRetry. Once a stop's
// grace is over, no more DSNs are written: they keep their marks too, and
// the next start writes them.
func (q *Queue) sendNotices(ids []string) {
	q.noticeMu.Lock()
	defer q.noticeMu.Unlock()
	now := q.opts.Now()
	var owed []*owedDSN
	for k, id := range ids {
		if q.graceOver.Load() {
			q.log.Info("queue: stopping with DSNs still to write; they stay owed and the next start queues them", "messages", len(ids)-k)
			break
		}
		var m *message
		err := q.db.View(func(tx *bbolt.Tx) error {
			var err error
			m, err = q.recs.get(tx, id)
			return err
		})
		if err != nil || m == nil || !m.owesNotice() {
			continue // gone, or sent meanwhile; a damaged record is logged at load
		}
		o := &owedDSN{orig: id, to: m.Envelope.From, marks: make(map[int]string)}
		var rcpts []dsnRecipient
		for i, r := range m.Recipients {
			if r.NoticeOwed != "" {
				o.marks[i] = r.NoticeOwed
				rcpts = append(rcpts, dsnRecipient{recipient: r, Action: r.NoticeOwed})
			}
		}
		if o.dsn, err = q.writeDSN(m, rcpts, now); err != nil {
			q.noticeFailed(id, m.Envelope.From, err)
			continue
		}
		owed = append(owed, o)
	}
	if len(owed) == 0 {
		return
	}
	var committed []*owedDSN
	var origs []*message
	err := q.spool.syncDir()
	if err == nil {
		err = q.commit.do(func(tx *bbolt.Tx) error {
			committed, origs = committed[:0], origs[:0]
			for _, o := range owed {
				m, err := q.recs.get(tx, o.orig)
				if err != nil || m == nil || !o.covers(m) {
					continue // deleted, or changed meanwhile: its marks stay for the next pass
				}
				for i := range o.marks {
					m.Recipients[i].NoticeOwed = ""
				}
				if err := q.recs.put(tx, o.dsn); err != nil {
					return err
				}
				if err := q.recs.save(tx, m); err != nil {
					return err
				}
				committed, origs = append(committed, o), append(origs, m)
			}
			return nil
		}, func() {
			for i, o := range committed {
				q.indexPut(origs[i])
				q.indexPut(o.dsn)
			}
		})
	}
	if err != nil {
		committed = nil
	}
	for _, o := range owed {
		if !slices.Contains(committed, o) {
			q.spool.remove(o.dsn.ID) // no record refers to it
		}
	}
	for _, o := range committed {
		metricEnqueued.Inc()
		q.log.Info("queued DSN", "id", o.dsn.ID, "orig_id", o.orig, "to", o.to)
	}
	if err != nil && !errors.Is(err, ErrClosed) {
		for _, o := range owed {
			q.noticeFailed(o.orig, o.to, err)
		}
	}
	if len(committed) > 0 {
		q.wake()
	}
}

// covers reports whether m still owes exactly the notices o was written for.
func (o *owedDSN) covers(m *message) bool {
	for i, a := range o.marks {
		if i >= len(m.Recipients) || m.Recipients[i].NoticeOwed != a {
			return false
		}
	}
	return true
}

// noticeFailed logs that the DSN about the message id to its sender to
// could not be queued, once per message: while the disk stays full, every
// pass fails again.
func (q *Queue) noticeFailed(id, to string, err error) {
	q.mu.Lock()
	logged, owed := q.owed[id]
	if owed {
		q.owed[id] = true
	}
	q.mu.Unlock()
	if logged || !owed {
		q.log.Debug("queue: DSN still cannot be written", "id", id, "err", err)
		return
	}
	q.log.Error("queue: cannot write a DSN; the recipients' outcome is recorded, the notice stays owed and is retried every minute",
		"id", id, "to", to, "spool", q.opts.Dir, "err", err)
}

// writeDSN builds a delivery status notification (RFC 3464) about orig for
// rcpts, from the null sender to the original envelope sender (RFC 5321
// §4.5.5), so that it travels this same queue, and writes its body to a
// spool file of its own, synced. The caller commits its record or removes
// the file.
func (q *Queue) writeDSN(orig *message, rcpts []dsnRecipient, now time.Time) (*message, error) {
	d, err := RecipientDomain(orig.Envelope.From)
	if err != nil {
		return nil, err // canNotify kept such a sender from being marked
	}
	limit := int64(maxHeaderBytes)
	if q.returnsFull(orig, rcpts) {
		limit = -1
	}
	original, err := q.readBody(orig.ID, limit)
	if errors.Is(err, errShortBody) {
		// What is left is returned: the notice matters more than the
		// copy of the message it carries.
		err = nil
	}
	if err != nil {
		return nil, err
	}
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	msgID := fmt.Sprintf("<%x.dsn@%s>", rnd, q.opts.Hostname)
	body, err := q.dsnBody(orig, rcpts, msgID, now, original)
	if err != nil {
		return nil, err
	}
	m := &message{
		Envelope: Envelope{
			From:      "",
			MessageID: msgID,
			// RFC 6531 §3.4: only the DSN's own envelope and header
			// fields need SMTPUTF8; UTF-8 in its global parts (RFC 6533)
			// is 8-bit body content, for which 8BITMIME suffices, so the
			// sender's MX need not offer SMTPUTF8 to get the notice.
			SMTPUTF8:   !isASCII(orig.Envelope.From),
			Body8Bit:   !asciiBytes(body),        // RFC 6152: so that no 7-bit host gets it
			RequireTLS: orig.Envelope.RequireTLS, // RFC 8689 §5: bounces keep REQUIRETLS
			OwnDSN:     true,
		},
		Arrived:    now,
		Recipients: []recipient{{RecipientParams: RecipientParams{Addr: orig.Envelope.From}, Domain: d, State: StateQueued, NextAttempt: now}},
	}
	if m.ID, m.Size, err = q.spool.write(now, bytes.NewReader(body), int64(len(body))); err != nil {
		return nil, err
	}
	return m, nil
}

// readBody returns up to limit bytes (all if limit < 0) of the body of
// the queued message id, through openBody: never a stretch freed
// meanwhile.
func (q *Queue) readBody(id string, limit int64) ([]byte, error) {
	q.mu.Lock()
	e := q.entryLocked(id)
	q.mu.Unlock()
	if e == nil {
		return nil, fmt.Errorf("message %s is no longer in the queue", id)
	}
	rc, err := q.openBody(e)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	if limit < 0 {
		return io.ReadAll(rc)
	}
	return io.ReadAll(io.LimitReader(rc, limit))
}

// returnsFull reports whether a DSN about rcpts returns the whole message.
// RFC 3461 §4.3: RET=FULL asks for it, and only in failure DSNs. Without
// RET stsrelay returns headers only, and always for REQUIRETLS messages
// (RFC 8689 §5); so it does for a message above BounceSizeLimit, which
// the sender's MX might refuse, notice and all.
func (q *Queue) returnsFull(orig *message, rcpts []dsnRecipient) bool {
	return q.fullAsked(orig, rcpts) && orig.Size <= q.opts.BounceSizeLimit
}

// fullAsked reports whether the sender asked for the whole message back
// and may have it.
func (q *Queue) fullAsked(orig *message, rcpts []dsnRecipient) bool {
	return worstAction(rcpts) == "failed" && strings.EqualFold(orig.Envelope.Ret, "FULL") && !orig.Envelope.RequireTLS
}

// worstAction is the Action that decides a DSN's subject and wording.
func worstAction(rcpts []dsnRecipient) string {
	worst := "delivered"
	for _, r := range rcpts {
		switch {
		case r.Action == "failed":
			worst = "failed"
		case r.Action == "delayed" && worst != "failed":
			worst = "delayed"
		}
	}
	return worst
}

// dsnBody writes the multipart/report message, with original: the whole
// message when returnsFull, else its header section (original may be the
// whole message or its first maxHeaderBytes).
func (q *Queue) dsnBody(orig *message, rcpts []dsnRecipient, msgID string, now time.Time, original []byte) ([]byte, error) {
	worst := worstAction(rcpts)
	full := q.returnsFull(orig, rcpts)
	if !full {
		original = headerSection(original[:min(len(original), maxHeaderBytes)])
	}

	host := q.opts.Hostname
	var b bytes.Buffer // the parts; the header section goes in front at the end
	mw := multipart.NewWriter(&b)
	subject := map[string]string{
		"failed":    "Undelivered Mail Returned to Sender",
		"delayed":   "Delayed Mail (still being retried)",
		"delivered": "Successful Mail Delivery Report", // relayed: no delivered DSN is ever made
	}[worst]
	hdr := []string{
		"From: Mail Delivery System <postmaster@" + host + ">",
		"To: <" + oneLine(orig.Envelope.From) + ">",
		"Subject: " + subject,
		"Date: " + now.Format(rfc5322Date),
		"Message-ID: " + msgID,
		"Auto-Submitted: auto-replied", // RFC 3834 §5
		"MIME-Version: 1.0",
		`Content-Type: multipart/report; report-type=delivery-status; boundary="` + mw.Boundary() + `"`,
	}

	// RFC 6533 §3, §6: a message with SMTPUTF8, or UTF-8 in what the
	// report says, gets the global types, with UTF-8 addresses as such.
	global := orig.Envelope.SMTPUTF8 || !isASCII(orig.Envelope.EnvID)
	for _, r := range rcpts {
		global = global || !isASCII(r.Addr) || !isASCII(r.ORcpt) || !isASCII(r.Last.Text) || !isASCII(r.Last.Reply)
	}
	// part writes one body part; 8-bit content is declared as such.
	eight := false // some part is 8-bit
	part := func(ct string, content []byte) error {
		h := textproto.MIMEHeader{"Content-Type": {ct}}
		if !asciiBytes(content) {
			h.Set("Content-Transfer-Encoding", "8bit")
			eight = true
		}
		w, err := mw.CreatePart(h)
		if err == nil {
			_, err = w.Write(content)
		}
		return err
	}

	// Part 1: for people (RFC 3464 §2, RFC 6522). It says every reason,
	// ours as well as the remote's.
	var w bytes.Buffer
	fmt.Fprintf(&w, "This is the mail system at host %s.\r\n\r\n", host)
	switch worst {
	case "failed":
		fmt.Fprintf(&w, "Your message could not be delivered to one or more recipients.\r\n")
		if !full && q.fullAsked(orig, rcpts) {
			fmt.Fprintf(&w, "It is larger than %d bytes, so only its header section is attached.\r\n\r\n", q.opts.BounceSizeLimit)
		} else {
			fmt.Fprintf(&w, "It is attached below.\r\n\r\n")
		}
	case "delayed":
		fmt.Fprintf(&w, "Your message could not be delivered yet. The mail system will keep\r\ntrying until %s; you do not need to resend it.\r\n\r\n",
			orig.Arrived.Add(q.opts.MaxQueueTime).Format(rfc5322Date))
	default:
		fmt.Fprintf(&w, "Your message was relayed to the mail systems of the following recipients,\r\n"+
			"which do not send delivery notifications; you will get no further notice\r\nfrom them.\r\n\r\n")
	}
	for _, r := range rcpts {
		fmt.Fprintf(&w, "<%s>: %s\r\n", oneLine(r.Addr), r.Action)
		if r.Last.Code != 0 {
			fmt.Fprintf(&w, "    %s\r\n", oneLine(r.Last.String()))
		}
	}
	if err := part("text/plain; charset=utf-8", w.Bytes()); err != nil {
		return nil, err
	}

	// Part 2: message/delivery-status (RFC 3464 §2.1–2.3).
	w.Reset()
	field := func(name, value string) { fmt.Fprintf(&w, "%s: %s\r\n", name, oneLine(value)) }
	field("Reporting-MTA", "dns; "+host)
	if orig.Envelope.EnvID != "" {
		field("Original-Envelope-Id", orig.Envelope.EnvID) // only with ENVID (§2.2.1); smtpin decoded the xtext
	}
	field("Arrival-Date", orig.Arrived.Format(rfc5322Date))
	for _, r := range rcpts {
		w.WriteString("\r\n")
		if r.ORcpt != "" {
			field("Original-Recipient", originalRecipient(r.ORcpt))
		}
		field("Final-Recipient", addressField(r.Addr))
		field("Action", r.Action)
		field("Status", statusCode(r.Action, r.Last))
		// §2.3.5: the MTA that gave this status, and none when the
		// status is our own decision (an earlier attempt's host is not it).
		if r.Last.RemoteMTA != "" {
			field("Remote-MTA", "dns; "+r.Last.RemoteMTA)
		}
		// §2.3.6: "smtp;" carries the remote's reply as received; our
		// own reasons are not disguised as one.
		switch {
		case r.Last.Reply != "":
			field("Diagnostic-Code", "smtp; "+r.Last.Reply)
		case r.Last.Code != 0:
			field("Diagnostic-Code", "X-stsrelay; "+r.Last.String())
		}
		if !r.LastAttempt.IsZero() {
			field("Last-Attempt-Date", r.LastAttempt.Format(rfc5322Date))
		}
		if r.Action == "delayed" {
			field("Will-Retry-Until", orig.Arrived.Add(q.opts.MaxQueueTime).Format(rfc5322Date)) // delayed only (§2.3.9)
		}
	}
	ct := "message/delivery-status"
	if global {
		ct = "message/global-delivery-status"
	}
	if err := part(ct, w.Bytes()); err != nil {
		return nil, err
	}

	// Part 3: the original message or its headers (RFC 3464 §2, RFC 6522;
	// RFC 6532 §3.7 and RFC 6533 §3 for the global types).
	switch {
	case full && global:
		ct = "message/global"
	case full:
		ct = "message/rfc822"
	case global:
		ct = "message/global-headers"
	default:
		ct = "text/rfc822-headers"
	}
	if err := part(ct, original); err != nil {
		return nil, err
	}
	if err := mw.Close(); err != nil {
		return nil, err
	}
	if eight {
		// RFC 2045 §6.4: a multipart's encoding is the domain of what it
		// holds (SevenBitDSN takes this line out again).
		hdr = append(hdr, eightBitField)
	}
	hdr = append(hdr, "", "This is a MIME-encapsulated message.", "")
	dsn := make([]byte, 0, b.Len()+1024)
	dsn = append(dsn, strings.Join(hdr, "\r\n")...)
	return append(dsn, b.Bytes()...), nil
}

// eightBitField declares an 8-bit DSN, in the header section dsnBody writes.
const eightBitField = "Content-Transfer-Encoding: 8bit"

// addressField is a Final-Recipient value: rfc822 for an ASCII address,
// utf-8 otherwise (RFC 6533 §3).
func addressField(addr string) string {
	if isASCII(addr) {
		return "rfc822; " + addr
	}
	return "utf-8; " + utf8AddrUnitext(addr)
}

// originalRecipient is the Original-Recipient value for ORCPT orcpt,
// "type;address" with the address decoded.
func originalRecipient(orcpt string) string {
	typ, addr, _ := strings.Cut(orcpt, ";")
	if strings.EqualFold(strings.TrimSpace(typ), "utf-8") {
		return "utf-8; " + utf8AddrUnitext(addr)
	}
	return orcpt
}

// utf8AddrUnitext encodes addr as RFC 6533 §3's utf-8-addr-unitext: UTF-8
// as it is, and "+", "=", "\\" and controls as \x{HEX}.
func utf8AddrUnitext(addr string) string {
	var b strings.Builder
	for _, r := range addr {
		if r < 0x21 || r == 0x7f || r == '+' || r == '=' || r == '\\' {
			fmt.Fprintf(&b, "\\x{%X}", r)
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

// asciiBytes is isASCII for a byte slice, without copying it.
func asciiBytes(b []byte) bool {
	for _, c := range b {
		if c >= 0x80 {
			return false
		}
	}
	return true
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
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
		// Never cut a UTF-8 sequence in half.
		n := 900
		for n > 0 && !utf8.RuneStart(s[n]) {
			n--
		}
		// ASCII: an ellipsis of ours must not make an ASCII report a
		// UTF-8 one (RFC 6533 types, 8-bit content).
		s = s[:n] + "..."
	}
	return s
}

// SevenBitDSN re-encodes a DSN this queue wrote (Envelope.OwnDSN) for a
// host without 8BITMIME, which must get no 8-bit octet (RFC 6152 §3):
// each 8-bit part in quoted-printable. The returned message becomes
// message/global, the one message type that may be so encoded (RFC 6532
// §3.7: message/rfc822 may not, RFC 2046 §5.2.1), so that the sender
// still gets the whole message asked for with RET=FULL. The other global
// types allow the encoding too (RFC 6533 §6). Nothing else about the
// notice changes; it is ours, so no signature breaks.
func SevenBitDSN(dsn []byte) ([]byte, error) {
	end := bytes.Index(dsn, []byte("\r\n\r\n"))
	if end < 0 || !asciiBytes(dsn[:end]) {
		return nil, errors.New("not a DSN with an ASCII header section")
	}
	hdr, err := textproto.NewReader(bufio.NewReader(bytes.NewReader(dsn[:end+4]))).ReadMIMEHeader()
	if err != nil {
		return nil, fmt.Errorf("the DSN's header section: %v", err)
	}
	mt, params, err := mime.ParseMediaType(hdr.Get("Content-Type"))
	boundary := params["boundary"]
	if err != nil || mt != "multipart/report" || boundary == "" {
		return nil, fmt.Errorf("not a DSN: Content-Type %q", hdr.Get("Content-Type"))
	}
	// The header section and the preamble go out as they are, but for
	// the 8-bit declaration.
	first := bytes.Index(dsn, []byte("\n--"+boundary+"\r\n"))
	if first < 0 || first < end {
		return nil, errors.New("not a DSN: no body part")
	}
	var out bytes.Buffer
	out.Grow(len(dsn) + len(dsn)/4)
	out.Write(bytes.Replace(dsn[:end+2], []byte("\r\n"+eightBitField+"\r\n"), []byte("\r\n"), 1))
	out.Write(dsn[end+2 : first+1])
	mw := multipart.NewWriter(&out)
	if err := mw.SetBoundary(boundary); err != nil {
		return nil, err
	}
	mr := multipart.NewReader(bytes.NewReader(dsn[first+1:]), boundary)
	var content bytes.Buffer
	for {
		p, err := mr.NextRawPart() // raw: a part's transfer encoding is ours to keep or set
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("a part of the DSN: %v", err)
		}
		content.Reset()
		if _, err := content.ReadFrom(p); err != nil {
			return nil, fmt.Errorf("a part of the DSN: %v", err)
		}
		h := p.Header
		if asciiBytes(content.Bytes()) {
			w, err := mw.CreatePart(h)
			if err == nil {
				_, err = w.Write(content.Bytes())
			}
			if err != nil {
				return nil, err
			}
			continue
		}
		ct, _, _ := mime.ParseMediaType(h.Get("Content-Type"))
		switch {
		case ct == "message/rfc822":
			h.Set("Content-Type", "message/global")
		case strings.HasPrefix(ct, "multipart/"), strings.HasPrefix(ct, "message/") && !strings.HasPrefix(ct, "message/global"):
			// RFC 2045 §6.4: composite types take no encoding.
			return nil, fmt.Errorf("an 8-bit %s part cannot be encoded", ct)
		}
		if bytes.Contains(content.Bytes(), []byte(boundary)) {
			// A soft line break could put it at the start of a line.
			return nil, errors.New("a part holds the DSN's boundary")
		}
		h.Set("Content-Transfer-Encoding", "quoted-printable")
		w, err := mw.CreatePart(h)
		if err != nil {
			return nil, err
		}
		qw := quotedprintable.NewWriter(w)
		if _, err := qw.Write(content.Bytes()); err != nil {
			return nil, err
		}
		if err := qw.Close(); err != nil {
			return nil, err
		}
	}
	if err := mw.Close(); err != nil {
		return nil, err
	}
	if !asciiBytes(out.Bytes()) {
		return nil, errors.New("8-bit octets outside the DSN's parts")
	}
	return out.Bytes(), nil
}
