// Package sts implements SMTP MTA Strict Transport Security (MTA-STS, RFC
// 8461) for outbound delivery: TXT discovery, the HTTPS policy fetch, policy
// parsing, a cache persisted in bbolt with background refresh, and the
// per-MX decision that the delivery engine asks for through
// policy.PolicySource.
//
// The delivery engine verifies certificates and composes deferral texts;
// this package decides, per MX host, whether it may be used and which names
// its certificate must carry.
//
// Where RFC 8461 leaves a choice, this package decides so (each decision is
// tested):
//   - max_age above 31557600 is capped at 31557600, not rejected (Parse).
//   - Blank lines in a policy, empty or of spaces and tabs, are ignored; a
//     repeated non-mx key: the first one wins; keys are case-sensitive.
//   - A TXT record counts as MTA-STS when it starts with "v=STSv1" followed
//     by ";", a blank or nothing; one with two id fields is invalid.
//   - A DNS failure for the TXT record with no unexpired cached policy means
//     no policy (deliver opportunistically), as a missing record does.
//   - A policy fetched with max_age 0 applies to the delivery that fetched
//     it; the next one fetches again.
//   - Policy fetch failures are recorded for TLSRPT once per fetch, not per
//     delivery; the 5-minute backoff (§3.3) is kept per domain and id.
//   - A delivery waits up to FetchWait for a fetch. If it is the first
//     fetch of the policy id, the delivery is then deferred: the policy may
//     arrive a moment later. If a fetch of that id has failed before, the
//     delivery goes on as without MTA-STS (§5.1), so a policy host that
//     never answers does not hold its domain's mail until it expires. The
//     last failed fetch is remembered per domain until one begun after it
//     succeeds, for at most 10,000 domains (the oldest is forgotten).
//   - Deliveries that see the same policy id share one fetch. One that sees
//     a new id while the old id's fetch runs starts a fetch of its own
//     rather than wait for that one, which may take its whole minute (§3.3:
//     a new id means fetch anew). Of fetches that overlap, the policy of
//     the one begun last is cached; an older one that ends later is given
//     to the deliveries that waited for it and dropped, unless nothing
//     begun after it brought a policy.
//   - The background refresh fetches the policy of each domain that had
//     mail in the last 7 days once it is a day old (or half its max_age),
//     so max_age keeps moving forward while mail flows (§10.2).
//   - With sts.match_cname_target, an MX host whose final CNAME target
//     matches the policy is accepted too, and its certificate may be valid
//     for any of the names that matched; SNI stays the MX name (§7.1).
package sts

import "errors"

// Errors callers branch on. A lookup that finds no applicable policy returns
// an error that wraps ErrNoPolicy and the cause (one of the others, a
// *RecordError, a *FetchError or a DNS error).
var (
	// ErrNoPolicy means the domain has no MTA-STS policy in force: deliver
	// as if it did not use MTA-STS (RFC 8461 §3.1, §5.1).
	ErrNoPolicy = errors.New("no MTA-STS policy")
	// ErrNoRecord means no TXT record starting with v=STSv1 exists.
	ErrNoRecord = errors.New("no MTA-STS TXT record")
	// ErrMultipleRecords means more than one v=STSv1 record exists, which
	// counts as no policy (RFC 8461 §3.1).
	ErrMultipleRecords = errors.New("more than one MTA-STS TXT record")
	// ErrFetchBackoff means the policy was not fetched because the last
	// fetch of the same id failed less than 5 minutes ago (RFC 8461 §3.3).
	ErrFetchBackoff = errors.New("policy fetch failed recently; waiting before trying again")
	// ErrAddressLiteral means the next hop is an address literal, which has
	// no policy domain (RFC 8461 §3.4).
	ErrAddressLiteral = errors.New("address literal has no MTA-STS policy")
	// ErrFetchPending means the first fetch of a policy id took longer
	// than a delivery waits (Options.FetchWait). Delivery defers rather
	// than go ahead without the policy; the fetch goes on.
	ErrFetchPending = errors.New("policy fetch still running")
	// ErrNotCached is returned by the admin API for a domain without a
	// cached policy.
	ErrNotCached = errors.New("no cached MTA-STS policy")
)
