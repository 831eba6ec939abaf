// Package tlsrpt implements SMTP TLS Reporting (RFC 8460) for outbound
// mail: it records the result of every TLS session and policy lookup,
// aggregates them per UTC day, policy domain and policy, discovers where
// a domain wants its reports (_smtp._tls TXT), and sends one daily JSON
// report per domain by mail (through stsrelay's own queue, DKIM-signed)
// or HTTPS POST.
//
// Decisions the RFC leaves open:
//   - mx-host is a JSON array of the MTA-STS policy's mx patterns (§4.4
//     calls it a list; Appendix B shows a single string, which cannot hold
//     a policy with several patterns). It is left out for TLSA and
//     no-policy-found, which have no patterns.
//   - The one-line reason for a failure goes in failure-reason-code, a text
//     field (§4.4); additional-information must be a URI and is never set.
//   - Sessions decided by an operator's local policy ([[delivery.policy]])
//     are not reported: the domain published no such policy, and reporting
//     them as another type would misstate what it published.
//   - Sessions that carried our own reports are not counted (§3). A
//     session is counted, or not, by the message it was opened for; a
//     connection delivery reuses for the next message is not counted again.
//   - A report counts as delivered once one of its rua URIs accepted it
//     (mailto: committed to the queue; https: any 2xx). Until then it is
//     retried with backoff for 24 hours from its first attempt (§5.5).
//     A TLSRPT record lookup that fails is retried for 24 hours from its
//     first failure, not from the day's end, so a relay back after a long
//     stop still tries; one cut off by a stop counts as no attempt.
package tlsrpt
