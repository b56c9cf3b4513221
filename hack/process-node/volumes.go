package main

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// volumeSet renders a Pod's volumes into directories below the Pod's directory; containers
// bind-mount them in their own mount namespace.
type volumeSet struct {
	pr       *podRun
	mu       sync.Mutex
	rendered map[string]map[string]fileData // volume -> last written content
}

type fileData struct {
	data []byte
	mode os.FileMode
}

func newVolumeSet(pr *podRun) *volumeSet {
	return &volumeSet{pr: pr, rendered: map[string]map[string]fileData{}}
}

func (vs *volumeSet) dir(name string) string { return filepath.Join(vs.pr.dir, "volumes", name) }

// sync (re)writes every ConfigMap, Secret, projected and downward API volume; unchanged
// volumes are left alone, changed ones are swapped atomically like a kubelet's.
func (vs *volumeSet) sync(ctx context.Context) error {
	pod := vs.pr.spec()
	for _, v := range pod.Spec.Volumes {
		dir := vs.dir(v.Name)
		switch {
		case v.EmptyDir != nil:
			if _, err := os.Stat(dir); os.IsNotExist(err) {
				if err := os.MkdirAll(dir, 0o777); err != nil {
					return fmt.Errorf("create emptyDir %s: %w", v.Name, err)
				}
				// world-writable like a kubelet's emptyDir, so any runAsUser can use it
				if err := os.Chmod(dir, 0o777); err != nil {
					return fmt.Errorf("chmod emptyDir %s: %w", v.Name, err)
				}
			}
			continue
		case v.HostPath != nil:
			continue
		}
		files, err := vs.render(ctx, pod, &v)
		if err != nil {
			return fmt.Errorf("volume %q: %w", v.Name, err)
		}
		if err := vs.write(v.Name, files, pod); err != nil {
			return fmt.Errorf("volume %q: %w", v.Name, err)
		}
	}
	return nil
}

func mode(m *int32, def int32) os.FileMode {
	if m != nil {
		return os.FileMode(*m)
	}
	return os.FileMode(def)
}

func (vs *volumeSet) render(ctx context.Context, pod *corev1.Pod, v *corev1.Volume) (map[string]fileData, error) {
	out := map[string]fileData{}
	switch {
	case v.ConfigMap != nil:
		err := vs.configMapFiles(ctx, pod, v.ConfigMap.Name, v.ConfigMap.Items, v.ConfigMap.Optional, mode(v.ConfigMap.DefaultMode, 0o644), out)
		return out, err
	case v.Secret != nil:
		err := vs.secretFiles(ctx, pod, v.Secret.SecretName, v.Secret.Items, v.Secret.Optional, mode(v.Secret.DefaultMode, 0o644), out)
		return out, err
	case v.DownwardAPI != nil:
		err := vs.downwardFiles(pod, v.DownwardAPI.Items, mode(v.DownwardAPI.DefaultMode, 0o644), out)
		return out, err
	case v.Projected != nil:
		def := mode(v.Projected.DefaultMode, 0o644)
		for _, src := range v.Projected.Sources {
			var err error
			switch {
			case src.ConfigMap != nil:
				err = vs.configMapFiles(ctx, pod, src.ConfigMap.Name, src.ConfigMap.Items, src.ConfigMap.Optional, def, out)
			case src.Secret != nil:
				err = vs.secretFiles(ctx, pod, src.Secret.Name, src.Secret.Items, src.Secret.Optional, def, out)
			case src.DownwardAPI != nil:
				err = vs.downwardFiles(pod, src.DownwardAPI.Items, def, out)
			case src.ServiceAccountToken != nil:
				t := src.ServiceAccountToken
				exp := int64(3607)
				if t.ExpirationSeconds != nil {
					exp = *t.ExpirationSeconds
				}
				var tok string
				tok, err = vs.pr.prov.sh.tokens.get(ctx, pod, t.Audience, exp)
				if err == nil {
					out[t.Path] = fileData{data: []byte(tok), mode: def}
				}
			case src.ClusterTrustBundle != nil:
				err = fmt.Errorf("clusterTrustBundle projections are not supported by process-node")
			}
			if err != nil {
				return nil, err
			}
		}
		return out, nil
	}
	return nil, fmt.Errorf("volume type is not supported by process-node (supported: configMap, secret, emptyDir, projected, downwardAPI, hostPath)")
}

func (vs *volumeSet) configMapFiles(ctx context.Context, pod *corev1.Pod, name string, items []corev1.KeyToPath, optional *bool, def os.FileMode, out map[string]fileData) error {
	cm, err := vs.pr.prov.sh.client.CoreV1().ConfigMaps(pod.Namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		if apierrors.IsNotFound(err) && optional != nil && *optional {
			return nil
		}
		return fmt.Errorf("configmap %q not found", name)
	}
	data := map[string][]byte{}
	for k, v := range cm.Data {
		data[k] = []byte(v)
	}
	for k, v := range cm.BinaryData {
		data[k] = v
	}
	return keyFiles("configmap", name, data, items, optional, def, out)
}

func (vs *volumeSet) secretFiles(ctx context.Context, pod *corev1.Pod, name string, items []corev1.KeyToPath, optional *bool, def os.FileMode, out map[string]fileData) error {
	s, err := vs.pr.prov.sh.client.CoreV1().Secrets(pod.Namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		if apierrors.IsNotFound(err) && optional != nil && *optional {
			return nil
		}
		return fmt.Errorf("secret %q not found", name)
	}
	return keyFiles("secret", name, s.Data, items, optional, def, out)
}

func keyFiles(kind, name string, data map[string][]byte, items []corev1.KeyToPath, optional *bool, def os.FileMode, out map[string]fileData) error {
	if len(items) == 0 {
		for k, v := range data {
			out[k] = fileData{data: v, mode: def}
		}
		return nil
	}
	for _, it := range items {
		v, ok := data[it.Key]
		if !ok {
			if optional != nil && *optional {
				continue
			}
			return fmt.Errorf("%s %q has no key %q", kind, name, it.Key)
		}
		out[it.Path] = fileData{data: v, mode: mode(it.Mode, int32(def))}
	}
	return nil
}

func (vs *volumeSet) downwardFiles(pod *corev1.Pod, items []corev1.DownwardAPIVolumeFile, def os.FileMode, out map[string]fileData) error {
	for _, it := range items {
		var v string
		var err error
		switch {
		case it.FieldRef != nil:
			v, err = vs.pr.fieldValue(pod, it.FieldRef.FieldPath)
		case it.ResourceFieldRef != nil:
			c := &corev1.Container{}
			for i := range pod.Spec.Containers {
				if pod.Spec.Containers[i].Name == it.ResourceFieldRef.ContainerName {
					c = &pod.Spec.Containers[i]
				}
			}
			v, err = vs.pr.resourceValue(c, it.ResourceFieldRef)
		}
		if err != nil {
			return err
		}
		out[it.Path] = fileData{data: []byte(v), mode: mode(it.Mode, int32(def))}
	}
	return nil
}

// write swaps the volume's content in atomically: files go into a fresh timestamped
// directory, the ..data symlink is renamed onto it, and each top-level entry is a symlink
// through ..data (the layout a kubelet uses, so file watchers behave the same).
func (vs *volumeSet) write(name string, files map[string]fileData, pod *corev1.Pod) error {
	vs.mu.Lock()
	defer vs.mu.Unlock()
	if prev, ok := vs.rendered[name]; ok && sameFiles(prev, files) {
		return nil
	}
	dir := vs.dir(name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	_ = os.Chmod(dir, 0o755)
	var gid = -1
	if psc := pod.Spec.SecurityContext; psc != nil && psc.FSGroup != nil {
		gid = int(*psc.FSGroup)
	}
	ts := filepath.Join(dir, ".."+time.Now().UTC().Format("2006_01_02_15_04_05.000000000"))
	if err := os.MkdirAll(ts, 0o755); err != nil {
		return err
	}
	for p, f := range files {
		clean := filepath.Clean(p)
		if strings.HasPrefix(clean, "..") || filepath.IsAbs(clean) {
			return fmt.Errorf("path %q leaves the volume", p)
		}
		full := filepath.Join(ts, clean)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			return err
		}
		m := f.mode
		if gid >= 0 {
			m |= (m & 0o700) >> 3 // the fsGroup gets the owner's read/write bits, as a kubelet does
		}
		if err := os.WriteFile(full, f.data, m); err != nil {
			return err
		}
		if err := os.Chmod(full, m); err != nil {
			return err
		}
		if gid >= 0 {
			if err := os.Chown(full, 0, gid); err != nil {
				return err
			}
		}
	}
	tmpLink := filepath.Join(dir, "..data_tmp")
	_ = os.Remove(tmpLink)
	if err := os.Symlink(filepath.Base(ts), tmpLink); err != nil {
		return err
	}
	oldTarget, _ := os.Readlink(filepath.Join(dir, "..data"))
	if err := os.Rename(tmpLink, filepath.Join(dir, "..data")); err != nil {
		return err
	}
	top := map[string]bool{}
	for p := range files {
		top[strings.SplitN(filepath.Clean(p), "/", 2)[0]] = true
	}
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		n := e.Name()
		if strings.HasPrefix(n, "..") {
			continue
		}
		if !top[n] {
			_ = os.Remove(filepath.Join(dir, n))
		}
	}
	for n := range top {
		link := filepath.Join(dir, n)
		if target, err := os.Readlink(link); err == nil && target == filepath.Join("..data", n) {
			continue
		}
		_ = os.RemoveAll(link)
		if err := os.Symlink(filepath.Join("..data", n), link); err != nil {
			return err
		}
	}
	if oldTarget != "" && oldTarget != filepath.Base(ts) {
		_ = os.RemoveAll(filepath.Join(dir, oldTarget))
	}
	vs.rendered[name] = files
	return nil
}

func sameFiles(a, b map[string]fileData) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		w, ok := b[k]
		if !ok || w.mode != v.mode || !bytes.Equal(w.data, v.data) {
			return false
		}
	}
	return true
}

// mountsFor maps the container's volumeMounts onto the rendered directories.
func (vs *volumeSet) mountsFor(c *corev1.Container) ([]shimMount, error) {
	pod := vs.pr.spec()
	byName := map[string]*corev1.Volume{}
	for i := range pod.Spec.Volumes {
		byName[pod.Spec.Volumes[i].Name] = &pod.Spec.Volumes[i]
	}
	var out []shimMount
	for _, m := range c.VolumeMounts {
		v, ok := byName[m.Name]
		if !ok {
			return nil, fmt.Errorf("volumeMount %q names no volume of the Pod", m.Name)
		}
		src := vs.dir(m.Name)
		if v.HostPath != nil {
			src = v.HostPath.Path
		}
		if m.SubPath != "" {
			src = filepath.Join(src, m.SubPath)
			if v.EmptyDir != nil {
				if err := os.MkdirAll(src, 0o777); err != nil {
					return nil, err
				}
			}
			// a subPath of a ConfigMap or Secret is a fixed copy, as with a kubelet
			if resolved, err := filepath.EvalSymlinks(src); err == nil {
				src = resolved
			}
		}
		ro := m.ReadOnly
		if v.ConfigMap != nil || v.Secret != nil || v.Projected != nil || v.DownwardAPI != nil {
			ro = true
		}
		out = append(out, shimMount{Source: src, Target: m.MountPath, ReadOnly: ro})
	}
	// longer targets last, so a mount inside another mount's directory stays visible
	sort.SliceStable(out, func(i, j int) bool { return len(out[i].Target) < len(out[j].Target) })
	return out, nil
}

// tokenCache holds bound ServiceAccount tokens from the TokenRequest API and renews them
// when 80% of their lifetime has passed, as a kubelet does.
type tokenCache struct {
	client kubernetes.Interface
	mu     sync.Mutex
	tokens map[string]cachedToken
}

type cachedToken struct {
	token   string
	renewAt time.Time
}

func newTokenCache(c kubernetes.Interface) *tokenCache {
	return &tokenCache{client: c, tokens: map[string]cachedToken{}}
}

func (tc *tokenCache) get(ctx context.Context, pod *corev1.Pod, audience string, exp int64) (string, error) {
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	key := fmt.Sprintf("%s/%s/%s/%d", pod.UID, sa, audience, exp)
	tc.mu.Lock()
	t, ok := tc.tokens[key]
	tc.mu.Unlock()
	if ok && time.Now().Before(t.renewAt) {
		return t.token, nil
	}
	req := &authv1.TokenRequest{Spec: authv1.TokenRequestSpec{
		ExpirationSeconds: &exp,
		BoundObjectRef:    &authv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
	}}
	if audience != "" {
		req.Spec.Audiences = []string{audience}
	}
	resp, err := tc.client.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(ctx, sa, req, metav1.CreateOptions{})
	if err != nil {
		return "", fmt.Errorf("request a token for serviceaccount %s/%s: %w", pod.Namespace, sa, err)
	}
	issued := time.Now()
	life := resp.Status.ExpirationTimestamp.Time.Sub(issued)
	tc.mu.Lock()
	tc.tokens[key] = cachedToken{token: resp.Status.Token, renewAt: issued.Add(life * 8 / 10)}
	tc.mu.Unlock()
	return resp.Status.Token, nil
}

func sortStrings(s []string) { sort.Strings(s) }
