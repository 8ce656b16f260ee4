package stack

import (
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"sync/atomic"
	"testing"
)

// DiskServer serves body at any path on a listener of its own address
// (127.0.0.1:0, [::1]:0, 127.0.0.2:0), or answers with h when h is set,
// and counts the requests that reached it: a source for URL imports whose
// address rules a test checks.
func DiskServer(t testing.TB, network, addr string, body []byte, h http.HandlerFunc) (*httptest.Server, *atomic.Int32) {
	t.Helper()
	var hits atomic.Int32
	l, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		if h != nil {
			h(w, r)
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		w.Write(body)
	}))
	srv.Listener.Close()
	srv.Listener = l
	srv.Start()
	t.Cleanup(srv.Close)
	return srv, &hits
}

// FileURL is the URL of file on srv with its host replaced by host (a
// name or address that reaches srv some other way), keeping the port.
func FileURL(t testing.TB, srv *httptest.Server, host, file string) string {
	t.Helper()
	_, port, err := net.SplitHostPort(srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	return "http://" + net.JoinHostPort(host, port) + "/files/" + file
}
