package sts

import (
	"errors"
	"testing"
)

func TestParseRecordAcceptsValidRecords(t *testing.T) {
	for txt, id := range map[string]string{
		"v=STSv1; id=20160831085700Z":                  "20160831085700Z",
		"v=STSv1;id=abc":                               "abc",
		"v=STSv1 ;\tid=abc ;":                          "abc",
		"v=STSv1; id=12345678901234567890123456789012": "12345678901234567890123456789012",
		"v=STSv1; id=x; ext-1.a=some!value":            "x",
	} {
		r, err := ParseRecord(txt)
		if err != nil || r.ID != id {
			t.Errorf("ParseRecord(%q) = %+v, %v; want id %q", txt, r, err, id)
		}
	}
}

func TestParseRecordRejectsSyntaxErrors(t *testing.T) {
	for name, txt := range map[string]string{
		"id with dashes":     "v=STSv1; id=2016-08-31",
		"id too long":        "v=STSv1; id=123456789012345678901234567890123",
		"empty id":           "v=STSv1; id=",
		"no id":              "v=STSv1;",
		"only version":       "v=STSv1",
		"two ids":            "v=STSv1; id=a; id=b",
		"empty field":        "v=STSv1;; id=a",
		"field without =":    "v=STSv1; id=a; foo",
		"ext value with =":   "v=STSv1; id=a; foo=b=c",
		"ext value with SP":  "v=STSv1; id=a; foo=b c",
		"lower-case version": "v=stsv1; id=a",
		"id first":           "id=a; v=STSv1",
	} {
		t.Run(name, func(t *testing.T) {
			r, err := ParseRecord(txt)
			var re *RecordError
			if !errors.As(err, &re) {
				t.Fatalf("ParseRecord(%q) = %+v, %v; want a *RecordError", txt, r, err)
			}
		})
	}
}

func TestIsRecordKeepsOnlySTSv1(t *testing.T) {
	for txt, want := range map[string]bool{
		"v=STSv1; id=a":   true,
		"v=STSv1":         true,
		"v=STSv1 ;id=a":   true,
		"v=STSv10; id=a":  false,
		"v=spf1 -all":     false,
		"v=TLSRPTv1; rua": false,
		"id=a; v=STSv1":   false,
		"V=STSv1; id=a":   false,
	} {
		if got := IsRecord(txt); got != want {
			t.Errorf("IsRecord(%q) = %v, want %v", txt, got, want)
		}
	}
}

// FuzzParseRecord checks that ParseRecord never panics and that what it
// accepts has a valid id and renders back to an equivalent record.
func FuzzParseRecord(f *testing.F) {
	for _, s := range []string{"v=STSv1; id=20160831085700Z;", "v=STSv1;id=a;ext=b", "v=STSv1 ; id=x ;", "v=STSv1; id=2016-08-31"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, txt string) {
		r, err := ParseRecord(txt)
		if err != nil {
			var re *RecordError
			if !errors.As(err, &re) {
				t.Fatalf("error %v is not a *RecordError", err)
			}
			return
		}
		if !IsRecord(txt) {
			t.Fatalf("accepted %q, which IsRecord discards", txt)
		}
		if len(r.ID) < 1 || len(r.ID) > 32 || !allAlnum(r.ID) {
			t.Fatalf("accepted id %q", r.ID)
		}
		again, err := ParseRecord(r.String())
		if err != nil || again.ID != r.ID || len(again.Extensions) != len(r.Extensions) {
			t.Fatalf("String() %q does not parse back: %+v, %v", r.String(), again, err)
		}
	})
}
