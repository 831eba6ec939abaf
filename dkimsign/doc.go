// Package dkimsign signs relayed mail with the [[dkim]] keys that have
// sign_relayed set: a message whose RFC 5322 From: domain is a key's
// domain, or a subdomain of it (DMARC relaxed alignment, RFC 7489 §3.1.1),
// gets one DKIM-Signature (RFC 6376) from the closest such key.
//
// Signing happens at delivery time, not at acceptance. The queue stores
// large bodies by streaming them to a spool file as they arrive, and a
// signature must be written before the body it covers; signing at
// acceptance would mean spooling every message once more (or teaching the
// queue to store a header apart from its body). At delivery the stored
// message is read twice instead: once through the signer, which hashes
// the body as it streams by and keeps only the header in memory, and once
// to send, the signature field in front. That costs one more read of the
// body per attempt and a fresh signature per attempt (harmless: each is
// valid on its own), and buys a key change that takes effect for mail
// already queued, and a queue and smtpin that know nothing of DKIM.
//
// Mail from a submission login is signed only when the login may use its
// From: address as MAIL FROM (Options.SenderAllowed, smtpin's rule):
// otherwise any login could get a domain's signature, and DMARC pass, by
// writing that domain in From:. Such mail goes out unsigned, with a
// warning; its envelope sender was allowed.
//
// A message is left as it is when its From: names no single address (none,
// several, or unparsable), when it already carries a DKIM-Signature with
// the same d= and s=, when it has the null reverse-path (the relay's own
// bounces and delay notices, and client-submitted ones alike), and when it
// is a TLS report (tlsrpt signs those itself, RFC 8460 §3). A key that
// fails to sign does not hold the message up: it goes out unsigned and a
// warning says why, since a deferral would retry into the same failure
// until the message expired.
package dkimsign
