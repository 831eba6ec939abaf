package tlsrpt

import (
	"io"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/dnstest"
	"github.com/stsrelay/stsrelay/policy"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/resolve"
)

// BenchmarkRecord is what delivery pays per session result, with the
// writer storing batches meanwhile.
func BenchmarkRecord(b *testing.B) {
	db, err := queue.OpenDB(filepath.Join(b.TempDir(), "stsrelay.db"))
	if err != nil {
		b.Fatal(err)
	}
	defer db.Close()
	res, err := resolve.New(resolve.Config{Servers: []string{dnstest.New(b).Addr}, Timeout: time.Second})
	if err != nil {
		b.Fatal(err)
	}
	r, err := New(Options{DB: db, Resolver: res, OrganizationName: "Example", ContactInfo: "tlsrpt@example.com",
		Sender: "tlsrpt@example.com", Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	results := []policy.SessionResult{
		result("example.net", stsID, 1, policy.ResultSuccess, "mx1.example.net", ""),
		result("example.org", nil, 2, policy.ResultSuccess, "mx.example.org", ""),
		result("example.net", stsID, 3, policy.ResultCertificateHostMismatch, "mx1.example.net", "certificate name mismatch"),
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		r.Record(results[i%len(results)])
	}
	b.StopTimer()
	r.Flush()
}
