package inspect

// needAt reads the n bytes of a structure at an offset the image itself
// declares. A hostile offset can lie past the end of the file or past
// 1<<63, where converting it to int64 would turn it negative, so it is
// checked against the file's size first: beyond it, the file ends before
// where; short of room for n bytes there, before what.
func (s *source) needAt(f Format, off uint64, n int, where, what string) ([]byte, error) {
	if off > uint64(s.size) {
		return nil, truncated(f, where)
	}
	return s.need(f, int64(off), n, what)
}
