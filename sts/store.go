package sts

import (
	"encoding/json"
	"fmt"
	"time"

	"go.etcd.io/bbolt"
)

// bucketPolicies holds one JSON storedPolicy per domain, keyed by domain,
// in the database the queue opens (queue.OpenDB).
var bucketPolicies = []byte("sts.policies")

// storedPolicy is the persisted form of a CachedPolicy.
type storedPolicy struct {
	ID       string    `json:"id"`
	Policy   string    `json:"policy"` // the policy file, as Policy.String renders it
	Fetched  time.Time `json:"fetched"`
	Expires  time.Time `json:"expires"`
	LastUsed time.Time `json:"last_used"`
}

// loadAll reads every stored policy; entries that no longer parse are
// skipped and reported, so one bad value cannot stop the daemon.
func loadAll(db *bbolt.DB) (map[string]*entry, []error, error) {
	entries := make(map[string]*entry)
	var bad []error
	err := db.Update(func(tx *bbolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketPolicies)
		if err != nil {
			return err
		}
		return b.ForEach(func(k, v []byte) error {
			var sp storedPolicy
			if err := json.Unmarshal(v, &sp); err != nil {
				bad = append(bad, fmt.Errorf("stored MTA-STS policy of %s: %w", k, err))
				return nil
			}
			p, err := Parse([]byte(sp.Policy))
			if err != nil {
				bad = append(bad, fmt.Errorf("stored MTA-STS policy of %s: %w", k, err))
				return nil
			}
			domain := string(k)
			entries[domain] = &entry{
				policy:   newCachedPolicy(domain, sp.ID, p, sp.Fetched, sp.Expires),
				lastUsed: sp.LastUsed,
			}
			return nil
		})
	})
	return entries, bad, err
}

func storePolicy(update func(func(*bbolt.Tx) error) error, cp *CachedPolicy, lastUsed time.Time) error {
	v, err := json.Marshal(storedPolicy{
		ID: cp.ID, Policy: cp.Policy.String(),
		Fetched: cp.Fetched.UTC(), Expires: cp.Expires.UTC(), LastUsed: lastUsed.UTC(),
	})
	if err != nil {
		return err
	}
	// The function may run twice (see Options.Update); a Put is the same
	// either way.
	return update(func(tx *bbolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketPolicies)
		if err != nil {
			return err
		}
		return b.Put([]byte(cp.Domain), v)
	})
}

func deletePolicy(update func(func(*bbolt.Tx) error) error, domain string) error {
	return update(func(tx *bbolt.Tx) error {
		b := tx.Bucket(bucketPolicies)
		if b == nil {
			return nil
		}
		return b.Delete([]byte(domain))
	})
}
