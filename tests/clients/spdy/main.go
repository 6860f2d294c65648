// A SPDY/3.1 client of the Kubernetes streaming protocols that runv did
// not write the transport of: moby/spdystream (Debian's
// golang-github-docker-spdystream-dev), the library under client-go's
// remotecommand and portforward, kubectl and the kubelet. The streams are
// opened as client-go opens them: for exec and attach an error stream,
// then stdin, stdout, stderr (not with a tty) and, from v3, a resize
// stream; for port forwarding an error and a data stream per connection,
// paired by a requestID header.
//
// Usage:
//
//	spdy-client exec URL [-protocols P1,P2] [-stdin TEXT] [-stdout] [-stderr] [-tty] [-resize WxH]
//	spdy-client portforward URL -port N [-send TEXT] [-connections N]
//
// Prints one JSON object with what came back; tests/cri_spdy.rs asserts on
// it. Exits 1 when the upgrade or a stream fails.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/moby/spdystream"
)

type result struct {
	Protocol string            `json:"protocol"`
	Status   int               `json:"status"`
	Body     string            `json:"body,omitempty"`
	Accepted []string          `json:"accepted,omitempty"`
	Stdout   string            `json:"stdout"`
	Stderr   string            `json:"stderr"`
	Error    string            `json:"error"`
	Data     []string          `json:"data,omitempty"`
	Errors   []string          `json:"errors,omitempty"`
	Rejected map[string]string `json:"rejected,omitempty"`
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "spdy-client: "+format+"\n", args...)
	os.Exit(1)
}

func out(r result) {
	b, _ := json.Marshal(r)
	fmt.Println(string(b))
}

// upgrade sends the request client-go's SPDY round tripper sends and
// returns the connection and the negotiated protocol; on a refusal it
// prints the status and exits 0.
func upgrade(raw string, protocols []string) (*spdystream.Connection, string) {
	u, err := url.Parse(raw)
	if err != nil {
		fail("%v", err)
	}
	conn, err := net.DialTimeout("tcp", u.Host, 10*time.Second)
	if err != nil {
		fail("%v", err)
	}
	req, _ := http.NewRequest("POST", raw, nil)
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "SPDY/3.1")
	for _, p := range protocols {
		req.Header.Add("X-Stream-Protocol-Version", p)
	}
	if err := req.Write(conn); err != nil {
		fail("writing the upgrade request: %v", err)
	}
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		fail("reading the upgrade response: %v", err)
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		body, _ := io.ReadAll(resp.Body)
		out(result{Status: resp.StatusCode, Body: string(body), Accepted: resp.Header.Values("X-Accepted-Stream-Protocol-Versions")})
		os.Exit(0)
	}
	if !strings.EqualFold(resp.Header.Get("Connection"), "upgrade") || !strings.EqualFold(resp.Header.Get("Upgrade"), "SPDY/3.1") {
		fail("not an SPDY/3.1 upgrade: %v", resp.Header)
	}
	if br.Buffered() > 0 {
		fail("%d bytes came before the first frame", br.Buffered())
	}
	c, err := spdystream.NewConnection(conn, false)
	if err != nil {
		fail("%v", err)
	}
	go c.Serve(spdystream.NoOpStreamHandler)
	return c, resp.Header.Get("X-Stream-Protocol-Version")
}

func create(c *spdystream.Connection, h http.Header) (*spdystream.Stream, error) {
	s, err := c.CreateStream(h, nil, false)
	if err != nil {
		return nil, err
	}
	return s, s.WaitTimeout(30 * time.Second)
}

func exec(raw string, args []string) {
	fs := flag.NewFlagSet("exec", flag.ExitOnError)
	protocols := fs.String("protocols", "v4.channel.k8s.io,v3.channel.k8s.io,v2.channel.k8s.io,channel.k8s.io", "offered, most preferred first")
	stdin := fs.String("stdin", "", "sent on stdin, which is then closed")
	withStdin := fs.Bool("with-stdin", false, "open stdin even when -stdin is empty")
	stdout := fs.Bool("stdout", true, "open a stdout stream")
	stderr := fs.Bool("stderr", true, "open a stderr stream (not with -tty)")
	tty := fs.Bool("tty", false, "the session has a terminal")
	resize := fs.String("resize", "", "WxH sent on the resize stream first")
	fs.Parse(args)
	var offered []string
	if *protocols != "" {
		offered = strings.Split(*protocols, ",")
	}
	c, protocol := upgrade(raw, offered)
	r := result{Protocol: protocol, Status: 101}
	header := func(t string) http.Header { h := http.Header{}; h.Set("streamType", t); return h }
	errStream, err := create(c, header("error"))
	if err != nil {
		fail("error stream: %v", err)
	}
	var in, o, e, rs *spdystream.Stream
	if *stdin != "" || *withStdin {
		if in, err = create(c, header("stdin")); err != nil {
			fail("stdin stream: %v", err)
		}
	}
	if *stdout {
		if o, err = create(c, header("stdout")); err != nil {
			fail("stdout stream: %v", err)
		}
	}
	if *stderr && !*tty {
		if e, err = create(c, header("stderr")); err != nil {
			fail("stderr stream: %v", err)
		}
	}
	v3 := protocol == "v3.channel.k8s.io" || protocol == "v4.channel.k8s.io"
	if *tty && v3 {
		if rs, err = create(c, header("resize")); err != nil {
			fail("resize stream: %v", err)
		}
		if *resize != "" {
			var w, h int
			fmt.Sscanf(*resize, "%dx%d", &w, &h)
			json.NewEncoder(rs).Encode(map[string]int{"Width": w, "Height": h})
		}
	}
	if in != nil {
		go func() {
			// Let a tty settle its size before the command reads.
			time.Sleep(500 * time.Millisecond)
			in.Write([]byte(*stdin))
			in.Close()
		}()
	}
	var wg sync.WaitGroup
	read := func(s *spdystream.Stream, into *string) {
		defer wg.Done()
		b, _ := io.ReadAll(s)
		*into = string(b)
	}
	if o != nil {
		wg.Add(1)
		go read(o, &r.Stdout)
	}
	if e != nil {
		wg.Add(1)
		go read(e, &r.Stderr)
	}
	wg.Add(1)
	go read(errStream, &r.Error)
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(120 * time.Second):
		fail("the session did not end in 120 s: %+v", r)
	}
	c.Close()
	out(r)
}

func portForward(raw string, args []string) {
	fs := flag.NewFlagSet("portforward", flag.ExitOnError)
	port := fs.Int("port", 0, "the pod's port")
	send := fs.String("send", "GET / HTTP/1.0\r\n\r\n", "written on each data stream")
	connections := fs.Int("connections", 1, "forwarded connections, at once, on the one SPDY connection")
	badPort := fs.String("bad-port", "", "also open a stream with this port header, which must be refused")
	fs.Parse(args)
	c, protocol := upgrade(raw, []string{"portforward.k8s.io"})
	r := result{Protocol: protocol, Status: 101, Data: make([]string, *connections), Errors: make([]string, *connections)}
	if *badPort != "" {
		h := http.Header{}
		h.Set("streamType", "data")
		h.Set("port", *badPort)
		h.Set("requestID", "bad")
		s, err := c.CreateStream(h, nil, false)
		if err != nil {
			fail("%v", err)
		}
		s.WaitTimeout(30 * time.Second)
		// A refused stream is finished at once: its read ends empty.
		b, _ := io.ReadAll(s)
		r.Rejected = map[string]string{*badPort: fmt.Sprintf("closed after %d bytes", len(b))}
	}
	var wg sync.WaitGroup
	for i := 0; i < *connections; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			h := http.Header{}
			h.Set("port", strconv.Itoa(*port))
			h.Set("requestID", strconv.Itoa(i))
			h.Set("streamType", "error")
			es, err := create(c, h)
			if err != nil {
				r.Errors[i] = "error stream: " + err.Error()
				return
			}
			es.Close() // nothing is written on it
			h.Set("streamType", "data")
			ds, err := create(c, h)
			if err != nil {
				r.Errors[i] = "data stream: " + err.Error()
				return
			}
			ds.Write([]byte(*send))
			var inner sync.WaitGroup
			inner.Add(1)
			go func() { defer inner.Done(); b, _ := io.ReadAll(es); r.Errors[i] = string(b) }()
			b, _ := io.ReadAll(ds)
			r.Data[i] = string(b)
			inner.Wait()
		}(i)
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(120 * time.Second):
		b, _ := json.Marshal(r)
		fail("port forwarding did not end in 120 s: %s", b)
	}
	c.Close()
	out(r)
}

func main() {
	if len(os.Args) < 3 {
		fail("usage: spdy-client exec|portforward URL [flags]")
	}
	switch os.Args[1] {
	case "exec":
		exec(os.Args[2], os.Args[3:])
	case "portforward":
		portForward(os.Args[2], os.Args[3:])
	default:
		fail("unknown mode %q", os.Args[1])
	}
}
