package policy

import "time"

// ResultType is an RFC 8460 §4.3 result type; ResultSuccess is a session
// that met its policy.
type ResultType string

const (
	ResultSuccess ResultType = ""

	// §4.3.1 negotiation failures.
	ResultSTARTTLSNotSupported    ResultType = "starttls-not-supported"
	ResultCertificateHostMismatch ResultType = "certificate-host-mismatch"
	ResultCertificateExpired      ResultType = "certificate-expired"
	ResultCertificateNotTrusted   ResultType = "certificate-not-trusted"
	ResultValidationFailure       ResultType = "validation-failure"
	// §4.3.2 policy failures: DANE.
	ResultTLSAInvalid   ResultType = "tlsa-invalid"
	ResultDNSSECInvalid ResultType = "dnssec-invalid"
	ResultDANERequired  ResultType = "dane-required"
	// §4.3.2 policy failures: MTA-STS.
	ResultSTSPolicyFetchError ResultType = "sts-policy-fetch-error"
	ResultSTSPolicyInvalid    ResultType = "sts-policy-invalid"
	ResultSTSWebPKIInvalid    ResultType = "sts-webpki-invalid"
)

// Failure is a TLS check that did not pass: the reason a person reads and
// the result type a report carries.
type Failure struct {
	Result ResultType
	Reason string // "certificate name mismatch"
}

func (f *Failure) Error() string { return f.Reason }

// SessionResult is one TLS session attempt with one MX host, or one failure
// to get a policy, as RFC 8460 §4 counts them.
type SessionResult struct {
	Time time.Time
	// PolicyDomain is the domain the report goes to; set also when no
	// policy was found.
	PolicyDomain string
	// Policy is the policy that applied; nil is "no-policy-found".
	Policy      *Identity
	MX          string // receiving-mx-hostname; "" for a policy fetch failure
	SendingIP   string // sending-mta-ip
	ReceivingIP string // receiving-ip
	HELO        string // receiving-mx-helo, from the greeting
	Result      ResultType
	Detail      string // failure-reason-code, one line
	// Unreported marks a session that TLS reports leave out (see
	// Requirement.Unreported).
	Unreported bool
}

// Recorder receives SessionResults. It must not block: delivery calls it
// inline.
type Recorder interface {
	Record(SessionResult)
}
