// Package smtpin is the submission listener: applications and a Postfix
// relayhost hand mail to stsrelay here (RFC 6409 submission with STARTTLS,
// RFC 8314 implicit TLS), and a message is committed to the queue before
// the client hears "250".
//
// github.com/emersion/go-smtp does the protocol work; this package decides
// who may relay, enforces the limits and hands the message over. Choices
// worth knowing:
//
//   - Relaying needs AUTH (PLAIN or LOGIN, bcrypt hashes) or a client
//     address in TrustedNetworks; everyone else gets 530 5.7.0 at MAIL.
//     AUTH needs TLS except from TrustedNetworks and, if
//     InsecureAuthFromLoopback is set, from loopback (538 5.7.11).
//   - SMTP smuggling: a bare CR or bare LF anywhere in the message, DATA or
//     BDAT, rejects it with 554 5.5.2; nothing is normalised. go-smtp
//     already ends DATA only at CRLF.CRLF, so the rest of such a message is
//     read as data and discarded, never run as commands. One exception:
//     go-smtp's DATA reader drops a CR right after a line's leading dot
//     (".\r"), so that CR is removed before we see it; removed, it cannot
//     end a message early here or downstream.
//   - Commands pipelined after STARTTLS are discarded: go-smtp builds a new
//     reader over the TLS connection, and the session starts over.
//   - Timeouts are idle timeouts, restarted by every read (RFC 5321
//     §4.5.3.2); the client stalling in DATA is dropped at once after the
//     421 reply.
//   - Per-client limits (connections, failed AUTH) count an IPv6 client by
//     its /64. Trusted networks are exempt from the connection cap: a
//     Postfix relayhost opens as many connections as its concurrency allows.
//   - TLS session tickets are off unless Options.SessionTickets is set.
//   - ENVID and ORCPT reach queue.Envelope decoded (xtext removed); a
//     relay passing them on must encode them again (RFC 3461 §4).
package smtpin
