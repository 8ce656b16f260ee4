package stack

import "strings"

// LogValues reads a function's log, slog's text format, and returns for
// each record whose msg is msg the value of its attribute attr, in order:
// "" for a record without it. Tests count what a replica did this way,
// such as the keys it logged as converted.
func LogValues(log []byte, msg, attr string) []string {
	var values []string
	for line := range strings.Lines(string(log)) {
		if !strings.Contains(line, " msg="+msg+" ") {
			continue
		}
		value := ""
		for field := range strings.FieldsSeq(line) {
			if v, ok := strings.CutPrefix(field, attr+"="); ok {
				value = v
				break
			}
		}
		values = append(values, value)
	}
	return values
}
