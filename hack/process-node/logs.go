package main

import (
	"bytes"
	"context"
	"io"
	"os"
	"strings"
	"time"

	"github.com/virtual-kubelet/virtual-kubelet/errdefs"
	"github.com/virtual-kubelet/virtual-kubelet/node/api"
)

func (pr *podRun) container(name string) *containerRun {
	for _, c := range append(append([]*containerRun{}, pr.init...), pr.ctrs...) {
		if c.spec.Name == name {
			return c
		}
	}
	if name == "" && len(pr.ctrs) == 1 {
		return pr.ctrs[0]
	}
	return nil
}

// logs serves the current (or, with previous, the last terminated) run's log file.
func (pr *podRun) logs(ctx context.Context, name string, opts api.ContainerLogOpts) (io.ReadCloser, error) {
	c := pr.container(name)
	if c == nil {
		return nil, errdefs.NotFoundf("container %q is not in pod %s", name, pr.name())
	}
	c.mu.Lock()
	restart, running := c.restarts, c.state.Running != nil
	c.mu.Unlock()
	if opts.Previous {
		if restart == 0 {
			return nil, errdefs.NotFoundf("previous terminated container %q in pod %s not found", name, pr.name())
		}
		restart--
		running = false
	}
	path := c.logPath(restart)
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, errdefs.NotFoundf("container %q has no log yet: %v", name, err)
	}
	if opts.Tail > 0 {
		b = []byte(tailLines(path, opts.Tail, 0))
	}
	if opts.LimitBytes > 0 && len(b) > opts.LimitBytes {
		b = b[:opts.LimitBytes]
	}
	if !opts.Follow || !running {
		return io.NopCloser(bytes.NewReader(b)), nil
	}
	// follow: stream what is appended until the run ends or the client goes away
	r, w := io.Pipe()
	go func() {
		defer w.Close()
		if _, err := w.Write(b); err != nil {
			return
		}
		f, err := os.Open(path)
		if err != nil {
			return
		}
		defer f.Close()
		offset := int64(len(b))
		if opts.Tail > 0 {
			fi, _ := f.Stat()
			offset = fi.Size()
		}
		buf := make([]byte, 32<<10)
		for ctx.Err() == nil {
			n, _ := f.ReadAt(buf, offset)
			if n > 0 {
				offset += int64(n)
				if _, err := w.Write(buf[:n]); err != nil {
					return
				}
				continue
			}
			c.mu.Lock()
			same := c.restarts == restart && c.state.Running != nil
			c.mu.Unlock()
			if !same {
				return
			}
			time.Sleep(300 * time.Millisecond)
		}
	}()
	return r, nil
}

// tailLines returns the last n lines of the file, at most maxBytes bytes when maxBytes > 0.
func tailLines(path string, n, maxBytes int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	s := strings.TrimRight(string(b), "\n")
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	out := strings.Join(lines, "\n")
	if s != "" {
		out += "\n"
	}
	if maxBytes > 0 && len(out) > maxBytes {
		out = out[len(out)-maxBytes:]
	}
	return out
}
