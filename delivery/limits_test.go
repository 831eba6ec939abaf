package delivery

import "testing"

// RFC 9422 §3.7: limits not known, and known ones with a malformed value,
// are ignored; names are read in any case.
func TestParseLimitsIgnoresWhatItCannotRead(t *testing.T) {
	for _, tc := range []struct {
		params string
		want   limits
	}{
		{"", limits{}},
		{"RCPTMAX=2", limits{rcptMax: 2}},
		{"rcptmax=2 RCPTDOMAINMAX=1 FUTUREMAX=9", limits{rcptMax: 2}},
		{"RCPTMAX=999999", limits{rcptMax: 999999}},
		{"RCPTMAX=abc RCPTMAX=0 RCPTMAX=9999999 RCPTMAX=-1 RCPTMAX= RCPTMAX RCPTMAX=2x", limits{}},
		{"RCPTMAX=abc RCPTMAX=3 RCPTMAX=4", limits{rcptMax: 3}},
	} {
		if got := parseLimits(tc.params); got != tc.want {
			t.Errorf("parseLimits(%q) = %+v, want %+v", tc.params, got, tc.want)
		}
	}
}
