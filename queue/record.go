package queue

import (
	"encoding/json"
	"fmt"
	"time"
)

// The stored form of a message: JSON with short keys, zero values left
// out and times as Unix nanoseconds. A queue of 100,000 messages must fit
// in a small resident set, and the record pages are what load touches.

type storedMessage struct {
	V           int               `json:"v"` // record format, 1
	ID          string            `json:"id"`
	From        string            `json:"f"`
	User        string            `json:"u,omitempty"`
	ClientAddr  string            `json:"c,omitempty"`
	MessageID   string            `json:"mid,omitempty"`
	Body8Bit    bool              `json:"8b,omitempty"`
	SMTPUTF8    bool              `json:"utf8,omitempty"`
	RequireTLS  bool              `json:"rtls,omitempty"`
	NoTLSPolicy bool              `json:"notls,omitempty"`
	TLSReport   bool              `json:"tlsrpt,omitempty"`
	OwnDSN      bool              `json:"dsn,omitempty"`
	Ret         string            `json:"ret,omitempty"`
	EnvID       string            `json:"envid,omitempty"`
	Size        int64             `json:"s"`
	BodyFile    string            `json:"bf,omitempty"`
	BodyOff     int64             `json:"bo,omitempty"`
	Arrived     int64             `json:"t"`
	Recipients  []storedRecipient `json:"r"`
}

type storedRecipient struct {
	Addr          string   `json:"a"`
	Notify        []string `json:"n,omitempty"`
	ORcpt         string   `json:"o,omitempty"`
	Domain        string   `json:"d"`
	State         State    `json:"st"`
	Attempts      int      `json:"at,omitempty"`
	NextAttempt   int64    `json:"nx,omitempty"`
	LastAttempt   int64    `json:"la,omitempty"`
	Code          int      `json:"lc,omitempty"`
	Enhanced      string   `json:"le,omitempty"`
	Text          string   `json:"lt,omitempty"`
	RemoteMTA     string   `json:"lr,omitempty"`
	Reply         string   `json:"lp,omitempty"`
	Relayed       bool     `json:"rl,omitempty"`
	LastMX        string   `json:"mx,omitempty"`
	DelayNotified bool     `json:"dn,omitempty"`
	ResumeAt      int64    `json:"ra,omitempty"`
	Skipped       int      `json:"sk,omitempty"`
	NoticeOwed    string   `json:"no,omitempty"`
}

func unixNano(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

func fromUnixNano(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n).UTC()
}

func encodeMessage(m *message) ([]byte, error) {
	e := &m.Envelope
	s := storedMessage{
		V: 1, ID: m.ID, From: e.From, User: e.User, ClientAddr: e.ClientAddr, MessageID: e.MessageID,
		Body8Bit: e.Body8Bit, SMTPUTF8: e.SMTPUTF8, RequireTLS: e.RequireTLS, NoTLSPolicy: e.NoTLSPolicy, TLSReport: e.TLSReport, OwnDSN: e.OwnDSN,
		Ret: e.Ret, EnvID: e.EnvID, Size: m.Size, BodyFile: m.BodyFile, BodyOff: m.BodyOff, Arrived: unixNano(m.Arrived),
		Recipients: make([]storedRecipient, len(m.Recipients)),
	}
	for i, r := range m.Recipients {
		s.Recipients[i] = storedRecipient{
			Addr: r.Addr, Notify: r.Notify, ORcpt: r.ORcpt, Domain: r.Domain, State: r.State,
			Attempts: r.Attempts, NextAttempt: unixNano(r.NextAttempt), LastAttempt: unixNano(r.LastAttempt),
			Code: r.Last.Code, Enhanced: r.Last.Enhanced, Text: r.Last.Text, RemoteMTA: r.Last.RemoteMTA,
			Reply: r.Last.Reply, Relayed: r.Last.Relayed, LastMX: r.LastMX, DelayNotified: r.DelayNotified,
			ResumeAt: unixNano(r.ResumeAt), Skipped: r.Skipped, NoticeOwed: r.NoticeOwed,
		}
	}
	return json.Marshal(&s)
}

func decodeMessage(v []byte) (*message, error) {
	var s storedMessage
	if err := json.Unmarshal(v, &s); err != nil {
		return nil, err
	}
	if s.V != 1 {
		return nil, fmt.Errorf("record format %d, this stsrelay reads format 1", s.V)
	}
	m := &message{
		ID: s.ID,
		Envelope: Envelope{
			From: s.From, User: s.User, ClientAddr: s.ClientAddr, MessageID: s.MessageID,
			Body8Bit: s.Body8Bit, SMTPUTF8: s.SMTPUTF8, RequireTLS: s.RequireTLS, NoTLSPolicy: s.NoTLSPolicy, TLSReport: s.TLSReport, OwnDSN: s.OwnDSN,
			Ret: s.Ret, EnvID: s.EnvID,
		},
		Size:       s.Size,
		BodyFile:   s.BodyFile,
		BodyOff:    s.BodyOff,
		Arrived:    fromUnixNano(s.Arrived),
		Recipients: make([]recipient, len(s.Recipients)),
	}
	for i, r := range s.Recipients {
		m.Recipients[i] = recipient{
			RecipientParams: RecipientParams{Addr: r.Addr, Notify: r.Notify, ORcpt: r.ORcpt},
			Domain:          r.Domain, State: r.State, Attempts: r.Attempts,
			NextAttempt: fromUnixNano(r.NextAttempt), LastAttempt: fromUnixNano(r.LastAttempt),
			Last:   Status{Code: r.Code, Enhanced: r.Enhanced, Text: r.Text, RemoteMTA: r.RemoteMTA, Reply: r.Reply, Relayed: r.Relayed},
			LastMX: r.LastMX, DelayNotified: r.DelayNotified,
			ResumeAt: fromUnixNano(r.ResumeAt), Skipped: r.Skipped, NoticeOwed: r.NoticeOwed,
		}
	}
	return m, nil
}
