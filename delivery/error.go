package delivery

import "github.com/stsrelay/stsrelay/queue"

// Error is a failure with the status it must give every recipient. A
// PolicySource returns one to defer (or fail) an attempt with its own words,
// for example 451 4.7.5 when a TLSA lookup fails in a secure zone.
type Error struct {
	Status queue.Status
}

func (e *Error) Error() string { return e.Status.String() }
