package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// imagesFile is the mapping contract shared with env-up and the tests:
// {"images": {"<repository>": "/abs/exe", "<repository>:<tag>": "/abs/exe"}}.
type imagesFile struct {
	Images map[string]string `json:"images"`
}

// resolveImage re-reads the mapping (so a test can register its image just before creating
// a Pod): an exact repository:tag entry wins, else the repository entry matches any tag.
func resolveImage(path, image string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("image %q: cannot read the image mapping %s: %v", image, path, err)
	}
	var f imagesFile
	if err := json.Unmarshal(b, &f); err != nil {
		return "", fmt.Errorf("image %q: the image mapping %s is not valid JSON: %v", image, path, err)
	}
	ref := image
	if i := strings.Index(ref, "@"); i >= 0 {
		ref = ref[:i]
	}
	repo, tag := ref, "latest"
	if i := strings.LastIndex(ref, ":"); i > strings.LastIndex(ref, "/") {
		repo, tag = ref[:i], ref[i+1:]
	}
	exe, ok := f.Images[repo+":"+tag]
	if !ok {
		exe, ok = f.Images[repo]
	}
	if !ok {
		return "", fmt.Errorf("Failed to pull image %q: image is not mapped to a local executable in %s", image, path)
	}
	if !filepath.IsAbs(exe) {
		return "", fmt.Errorf("Failed to pull image %q: mapped path %q is not absolute", image, exe)
	}
	if fi, err := os.Stat(exe); err != nil || fi.IsDir() || fi.Mode()&0o111 == 0 {
		return "", fmt.Errorf("Failed to pull image %q: mapped executable %s does not exist or is not executable", image, exe)
	}
	return exe, nil
}

func writeJSON(f *os.File, v any) error {
	defer f.Close()
	return json.NewEncoder(f).Encode(v)
}
