// Package smtpin is the submission listener: applications and a Postfix
// relayhost hand mail to stsrelay here (RFC 6409 submission with STARTTLS,
// RFC 8314 implicit TLS), and a message is committed to the queue before
// the client hears "250".
//
// github.com/emersion/go-smtp does the protocol work; this package decides
// who may relay, enforces the limits and hands the message over.
//
// Relaying needs AUTH (PLAIN or LOGIN, bcrypt hashes) or a client address
// in TrustedNetworks; everyone else gets 530 5.7.0 at MAIL. AUTH needs TLS
// except from TrustedNetworks and, if InsecureAuthFromLoopback is set (main
// sets it), from loopback. The whole matrix, pinned by TestOpenRelayMatrix
// (TLS is STARTTLS or implicit TLS):
//
//	trusted  AUTH  TLS  answer
//	no       no    no   MAIL 530 5.7.0
//	no       no    yes  MAIL 530 5.7.0
//	no       yes   no   AUTH not offered, 538 5.7.11; MAIL 530 5.7.0
//	no       yes   yes  relays; MAIL FROM held to allowed_senders (553 5.7.1)
//	yes      no    no   relays, any sender
//	yes      no    yes  relays, any sender
//	yes      yes   no   relays; MAIL FROM held to allowed_senders (553 5.7.1)
//	yes      yes   yes  relays; MAIL FROM held to allowed_senders (553 5.7.1)
//
// Loopback with InsecureAuthFromLoopback may AUTH without TLS as a trusted
// client may; it still relays only after AUTH.
//
// Choices worth knowing:
//
//   - SMTP smuggling: a bare CR or bare LF anywhere in the message, DATA or
//     BDAT, rejects it with 554 5.5.2; nothing is normalised. go-smtp
//     already ends DATA only at CRLF.CRLF, so the rest of such a message is
//     read as data and discarded, never run as commands. One exception:
//     go-smtp's DATA reader drops a CR right after a line's leading dot
//     (".\r"), so that CR is removed before we see it; removed, it cannot
//     end a message early here or downstream. A NUL byte is refused too
//     (554 5.6.0): 7bit and 8bit text holds none (RFC 2045 §2.8).
//   - Commands pipelined after STARTTLS are discarded: go-smtp builds a new
//     reader over the TLS connection, and the session starts over.
//   - Timeouts are idle timeouts, restarted by every read (RFC 5321
//     §4.5.3.2); the client stalling in DATA is dropped at once after the
//     421 reply.
//   - Per-client limits (connections, failed AUTH) count an IPv6 client by
//     its /64. Trusted networks are exempt from the connection caps, per
//     client and in all (MaxConns): a Postfix relayhost opens as many
//     connections as its concurrency allows, and a flood from elsewhere
//     must not lock it out.
//   - TLS session tickets are off unless Options.SessionTickets is set.
//   - A message the queue could not store gets 451 4.3.0; when its file
//     system is full (queue.ErrNoSpace), 452 4.3.1 (RFC 3463 X.3.1), which
//     tells the client the condition will pass.
//   - A message with any octet above 127 is stored as 8-bit, whatever its
//     BODY= said (RFC 6152 §3; many clients do not declare it).
//   - ENVID and ORCPT reach queue.Envelope decoded (xtext removed); a
//     relay passing them on must encode them again (RFC 3461 §4).
//   - "RCPT TO:<Postmaster>" without a domain goes to Options.Postmaster
//     (RFC 5321 §4.5.1), from clients that may relay: it opens no way
//     around AUTH.
//   - A connection cut off with a 421 shuts its write side and drops the
//     client's input for up to two seconds before closing, so that the
//     reset a close with unread input sends does not take the 421 with it.
//
// Gaps of go-smtp v0.25.1 (v0.26.0, the newest release, has them too)
// closed here, each with a test that fails against go-smtp alone:
//
//   - After a failed STARTTLS handshake go-smtp answers 550 and reads on in
//     plaintext, running commands it had buffered: the session ends with
//     421 4.7.0 instead (TestFailedSTARTTLSHandshakeEndsSession).
//   - After a rejected message go-smtp reads the rest with no bound but the
//     idle timeout: that drain gets DataTimeout in all, and a client may
//     never send more than twice MaxMessageSize (plus 64 KiB) without a
//     reply, which also bounds the BDAT chunks go-smtp discards
//     (TestRejectedMessageDrainIsBounded*, TestRefusedBDATChunkDiscardIsBounded).
//     A client cut off that way gets the reply, then the connection closes.
//   - go-smtp refuses a DATA message of exactly its size limit. Its limit
//     is left off and smtpin counts the message itself, so EHLO announces
//     SIZE without a number (RFC 1870 §4 allows it) and an oversized SIZE=
//     is refused at MAIL (TestMessageOfExactlyMaxSizeAccepted).
//   - go-smtp caps nothing in all: MaxConns does (TestTotalConnectionsCapped).
//
// Others are fixed in go-smtp itself, in the copy the build uses
// (third_party/go-smtp; its README lists them):
//
//   - A connection that ends inside a BDAT chunk, by TCP or by a TLS
//     close_notify, aborts the message instead of ending it short but
//     "complete" (TestHostileSessionsLeaveOnlyAcceptedMessagesInRealQueue).
//   - A read that times out or fails inside a BDAT chunk gets 421 4.4.2
//     and the connection closes, as in DATA; v0.25.1 answered 554 with the
//     socket error and read on (TestStalledBDATChunkTimesOutLikeData).
//   - DATA is read, and its line lengths measured, in runs rather than
//     byte by byte.
//   - A reply goes out in one write, the replies to a pipelined group of
//     MAIL and RCPT commands together (RFC 2920 §3.2 (10)).
//   - <a@b@example.org>, an '@' in a local part without quotes, is a
//     syntax error (501): go-smtp drops the quotes of <"a@b"@example.org>,
//     and smtpin would store the one it took for the other, quoted
//     (TestUnquotedAtSignInTheLocalPartRefused).
//   - Commands pipelined after "Too many errors" (or QUIT) are not run:
//     the connection ends there. v0.25.1 ran them against the session it
//     had closed, and panicked (TestCommandsAfterTooManyErrorsNotRun).
//     Panics go-smtp recovers from are still counted and their stack
//     traces rate-limited in the log, should another turn up.
//   - Undecodable AUTH base64 is answered 501 5.5.2 (RFC 4954 §4), not
//     454 4.7.0 (TestAuthWithGarbageBase64).
//   - AUTH during a mail transaction is refused with 503 5.5.1 (RFC 4954
//     §4); v0.25.1 took it after MAIL (TestAuthDuringMailTransactionRefused).
//   - The EHLO name and an unknown verb are echoed in replies with a bare
//     CR, other control characters and non-ASCII as '?', and the name
//     cut at 255 octets; v0.25.1 echoed them as sent (FuzzSession checks
//     every reply line).
package smtpin
