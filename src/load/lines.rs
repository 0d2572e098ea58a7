//! Where each field of a YAML text is: its path (`spec.metrics[1].prometheus.query`, the form
//! problems name) mapped to its 1-based line, per document. serde_yaml's values carry no
//! positions, so the text is read a second time by an event parser that does.

use std::collections::HashMap;

use granit_parser::{Event, Parser};

/// Each document's field lines, in document order; a field's line is its key's (an item's, for
/// a list item). The map ends where the text stops being YAML.
pub(crate) fn field_lines(text: &str) -> Vec<HashMap<String, usize>> {
    enum Frame {
        Map { path: String, key: Option<String> },
        Seq { path: String, next: usize },
    }
    // The path of the node that comes next, and marks its slot as taken.
    fn next_path(stack: &mut [Frame]) -> String {
        match stack.last_mut() {
            None => String::new(),
            Some(Frame::Map { path, key }) => match key.take() {
                Some(k) if path.is_empty() => k,
                Some(k) => format!("{path}.{k}"),
                // A complex key (a list or mapping as a key): no field path.
                None => format!("{path}.?"),
            },
            Some(Frame::Seq { path, next }) => {
                *next += 1;
                format!("{path}[{}]", *next - 1)
            }
        }
    }
    // Whether the next scalar is a mapping's key.
    fn at_key(stack: &[Frame]) -> bool {
        matches!(stack.last(), Some(Frame::Map { key: None, .. }))
    }

    let mut docs = Vec::new();
    let mut lines: HashMap<String, usize> = HashMap::new();
    let mut stack: Vec<Frame> = Vec::new();
    for event in Parser::new_from_str(text) {
        let Ok((event, span)) = event else { break };
        let line = span.start.line();
        match event {
            Event::DocumentStart(..) => {
                lines = HashMap::new();
                stack.clear();
            }
            Event::DocumentEnd => docs.push(std::mem::take(&mut lines)),
            Event::Scalar(text, ..) if at_key(&stack) => {
                if let Some(Frame::Map { path, key }) = stack.last_mut() {
                    let field = if path.is_empty() {
                        text.to_string()
                    } else {
                        format!("{path}.{text}")
                    };
                    lines.entry(field).or_insert(line);
                    *key = Some(text.into_owned());
                }
            }
            Event::Scalar(..) | Event::Alias(_) => {
                let path = next_path(&mut stack);
                lines.entry(path).or_insert(line);
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let path = if at_key(&stack) {
                    // A complex key: its contents have no field path.
                    "?".to_string()
                } else {
                    next_path(&mut stack)
                };
                lines.entry(path.clone()).or_insert(line);
                stack.push(if matches!(event, Event::MappingStart(..)) {
                    Frame::Map { path, key: None }
                } else {
                    Frame::Seq { path, next: 0 }
                });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                stack.pop();
            }
            _ => {}
        }
    }
    docs
}

/// The line of `path`, or of the closest enclosing field that has one (a missing field is
/// reported on its parent's line).
pub(crate) fn line_of(lines: &HashMap<String, usize>, path: &str) -> Option<usize> {
    let mut p = path;
    loop {
        if let Some(l) = lines.get(p) {
            return Some(*l);
        }
        let cut = p.rfind(['.', '['])?;
        p = &p[..cut];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_their_lines_in_every_document() {
        let text = "\
kind: ConfigMap
---
kind: ScalingPolicy
spec:
  maxReplicas: 10
  metrics:
  - name: rps
    prometheus: {query: 'sum(up'}
  - name: cpu
    resource:
      name: cpu
";
        let docs = field_lines(text);
        assert_eq!(docs.len(), 2);
        let d = &docs[1];
        assert_eq!(d["kind"], 3);
        assert_eq!(d["spec.maxReplicas"], 5);
        assert_eq!(d["spec.metrics[0]"], 7);
        assert_eq!(d["spec.metrics[0].prometheus.query"], 8);
        assert_eq!(d["spec.metrics[1].resource.name"], 11);
        assert_eq!(line_of(d, "spec.metrics[1].target"), Some(9));
        assert_eq!(line_of(d, "spec.minReplicas"), Some(4));
        assert_eq!(line_of(d, "nothing"), None);
    }
}
