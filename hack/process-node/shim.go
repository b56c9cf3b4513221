package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
)

// shimCommand is the hidden subcommand that sets up a container's mount namespace and user,
// then execs the container's process in place (so its pid is the container's pid).
const shimCommand = "container-shim"

type shimMount struct {
	Source   string `json:"source"`
	Target   string `json:"target"`
	ReadOnly bool   `json:"readOnly,omitempty"`
}

type shimSpec struct {
	Argv         []string    `json:"argv"`
	Env          []string    `json:"env"`
	Mounts       []shimMount `json:"mounts"`
	WorkingDir   string      `json:"workingDir,omitempty"`
	UID          uint32      `json:"uid"`
	GID          uint32      `json:"gid"`
	Groups       []uint32    `json:"groups,omitempty"`
	ReadOnlyRoot bool        `json:"readOnlyRoot,omitempty"`
}

// shimCommandFor starts the shim in a new mount namespace and process group; the returned
// reader yields the shim's setup error, or EOF once the container's process was exec'd.
func shimCommandFor(self, specPath string, stdout, stderr io.Writer) (*exec.Cmd, *os.File, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, nil, fmt.Errorf("create status pipe: %w", err)
	}
	cmd := exec.Command(self, shimCommand, specPath)
	cmd.Stdout, cmd.Stderr = stdout, stderr
	cmd.ExtraFiles = []*os.File{w}
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNS, Setpgid: true, Pdeathsig: 0}
	if err := cmd.Start(); err != nil {
		r.Close()
		w.Close()
		return nil, nil, fmt.Errorf("start container shim: %w", err)
	}
	w.Close()
	return cmd, r, nil
}

func readAll(r *os.File) string {
	defer r.Close()
	b, _ := io.ReadAll(r)
	return strings.TrimSpace(string(b))
}

// runShim never returns: it execs the container or exits 128 after reporting on fd 3.
func runShim(args []string) {
	status := os.NewFile(3, "status")
	syscall.CloseOnExec(3)
	fail := func(format string, a ...any) {
		msg := fmt.Sprintf(format, a...)
		_, _ = status.WriteString(msg)
		fmt.Fprintln(os.Stderr, "process-node: "+msg)
		os.Exit(128)
	}
	if len(args) != 1 {
		fail("container-shim needs the spec file")
	}
	b, err := os.ReadFile(args[0])
	if err != nil {
		fail("read spec: %v", err)
	}
	var spec shimSpec
	if err := json.Unmarshal(b, &spec); err != nil {
		fail("decode spec: %v", err)
	}
	// mounts below must not propagate back to the host's namespace
	if err := syscall.Mount("none", "/", "", syscall.MS_REC|syscall.MS_PRIVATE, ""); err != nil {
		fail("make mounts private: %v", err)
	}
	// mount points and the working directory exist before the root may become read-only
	for _, m := range spec.Mounts {
		fi, err := os.Stat(m.Source)
		if err != nil {
			fail("mount source %s: %v", m.Source, err)
		}
		if fi.IsDir() {
			if err := os.MkdirAll(m.Target, 0o755); err != nil {
				fail("create mount point %s: %v", m.Target, err)
			}
		} else {
			if err := os.MkdirAll(filepath.Dir(m.Target), 0o755); err != nil {
				fail("create mount point %s: %v", m.Target, err)
			}
			if _, err := os.Stat(m.Target); os.IsNotExist(err) {
				if err := touch(m.Target, 0o644); err != nil {
					fail("%v", err)
				}
			}
		}
	}
	if spec.WorkingDir != "" {
		if err := os.MkdirAll(spec.WorkingDir, 0o755); err != nil {
			fail("create working directory %s: %v", spec.WorkingDir, err)
		}
	}
	for _, m := range spec.Mounts {
		if err := syscall.Mount(m.Source, m.Target, "", syscall.MS_BIND|syscall.MS_REC, ""); err != nil {
			fail("mount %s at %s: %v", m.Source, m.Target, err)
		}
		if m.ReadOnly {
			if err := syscall.Mount("", m.Target, "", syscall.MS_REMOUNT|syscall.MS_BIND|syscall.MS_RDONLY, ""); err != nil {
				fail("make %s read-only: %v", m.Target, err)
			}
		}
	}
	// the root goes read-only last: a bind mount copies its source mount's flags, so volumes
	// (which live on the root filesystem) mounted after this would be read-only too
	if spec.ReadOnlyRoot {
		if err := syscall.Mount("", "/", "", syscall.MS_REMOUNT|syscall.MS_BIND|syscall.MS_RDONLY, ""); err != nil {
			fail("make the root filesystem read-only: %v", err)
		}
	}
	path := spec.Argv[0]
	if !strings.Contains(path, "/") {
		found, err := lookPath(path, spec.Env)
		if err != nil {
			fail("%v", err)
		}
		path = found
	}
	groups := make([]int, 0, len(spec.Groups))
	for _, g := range spec.Groups {
		groups = append(groups, int(g))
	}
	if err := syscall.Setgroups(groups); err != nil {
		fail("setgroups: %v", err)
	}
	if err := syscall.Setgid(int(spec.GID)); err != nil {
		fail("setgid %d: %v", spec.GID, err)
	}
	if err := syscall.Setuid(int(spec.UID)); err != nil {
		fail("setuid %d: %v", spec.UID, err)
	}
	wd := spec.WorkingDir
	if wd == "" {
		wd = "/"
	}
	if err := os.Chdir(wd); err != nil {
		fail("chdir %s: %v", wd, err)
	}
	err = syscall.Exec(path, spec.Argv, spec.Env)
	fail("exec %s: %v", path, err)
}

func lookPath(name string, env []string) (string, error) {
	pathVar := "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	for _, e := range env {
		if strings.HasPrefix(e, "PATH=") {
			pathVar = e[5:]
		}
	}
	for _, dir := range filepath.SplitList(pathVar) {
		p := filepath.Join(dir, name)
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("executable file %q not found in $PATH", name)
}
