// Package policy holds the contracts that delivery, sts, dane and tlsrpt
// share: the TLS that a connection to one MX host must have (Requirement),
// the published or local policy that asked for it (Identity), the sources
// that decide it (PolicySource, Chain), and what each TLS session showed
// (SessionResult), which RFC 8460 reports group per policy.
//
// It does no I/O, so the protocol packages can depend on it without
// depending on the delivery engine, the queue or an SMTP library.
package policy
